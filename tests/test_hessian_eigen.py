"""hessian_top_eigenvalue: the residual stopping rule, a start nearly orthogonal to the top
eigenvector, negative curvature, and the start vector's checks.

The model is a quadratic form ``0.5 w^T A w`` with a constructed symmetric ``A`` (its Hessian),
so every eigenvalue and eigenvector is known exactly.
"""
import pytest
import torch
import torch.nn as nn

from nbbatch.geometry import hessian_top_eigenvalue


class QuadraticForm(nn.Module):
    """Loss 0.5 w^T A w at w = 0 (any input): Hessian A."""

    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.zeros(len(a), dtype=a.dtype))

    def forward(self, x):
        return (0.5 * self.w @ self.a @ self.w).expand(len(x))


def mean_out(out, y):
    return out.mean()


DATA = (torch.zeros(4, 1), torch.zeros(4))


def hessian(eigenvalues, seed=0):
    """A = Q diag(eigenvalues) Q^T with a random orthogonal Q (float64); returns (A, Q)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q @ torch.diag(lam) @ q.T, q


def spectrum_with_close_top(p=60):
    # lambda_2 / lambda_1 = 0.78, the rest spread below
    return torch.cat([torch.tensor([1.0, 0.78], dtype=torch.float64),
                      torch.linspace(0.7, 0.01, p - 2, dtype=torch.float64)])


def power_iteration_relative_change(a, v, tol=1e-4, iters=100):
    """The former stopping rule (relative change of the Rayleigh quotient), for comparison."""
    v = v / v.norm()
    estimate = None
    for _ in range(iters):
        hv = a @ v
        rayleigh = float(v @ hv)
        v = hv / hv.norm()
        if estimate is not None and abs(rayleigh - estimate) <= tol * abs(rayleigh):
            return rayleigh
        estimate = rayleigh
    return estimate


@pytest.mark.parametrize("overlap", [6e-5, 1e-9, 0.0])
def test_a_start_nearly_orthogonal_to_the_top_eigenvector_still_finds_it(overlap):
    lam = spectrum_with_close_top()
    a, q = hessian(lam)
    rest = q[:, 2:] @ torch.randn(len(lam) - 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = q[:, 1] + overlap * q[:, 0] + 1e-3 * rest          # mostly the second eigenvector
    assert abs(float(start @ q[:, 0])) / float(start.norm()) <= 6e-5
    # this start defeats the relative-change rule: it stops at lambda_2 (22% low)
    assert power_iteration_relative_change(a, start) == pytest.approx(0.78, rel=1e-3)
    got = hessian_top_eigenvalue(QuadraticForm(a), DATA, mean_out, start=start, tol=1e-6)
    assert got == pytest.approx(1.0, rel=1e-5)
    # the same start as a list of parameter-shaped tensors
    assert hessian_top_eigenvalue(QuadraticForm(a), DATA, mean_out, start=[start], tol=1e-6) == got


def test_random_starts_converge_to_the_top_eigenvalue_for_every_seed():
    a, _ = hessian(spectrum_with_close_top())
    got = [hessian_top_eigenvalue(QuadraticForm(a), DATA, mean_out, seed=s) for s in range(20)]
    assert max(abs(g - 1.0) for g in got) <= 1e-4


def test_the_result_satisfies_the_residual_bound():
    # tol bounds the distance to an eigenvalue: |lambda - lambda_1| <= tol |lambda|
    a, _ = hessian(spectrum_with_close_top(200), seed=2)
    for tol in (1e-2, 1e-3):
        got = hessian_top_eigenvalue(QuadraticForm(a), DATA, mean_out, tol=tol, restarts=0)
        assert abs(got - 1.0) <= tol * abs(got)


@pytest.mark.parametrize("eigenvalues, top", [
    ([-3.0, 2.0, 1.0, 0.5, -0.2] + [0.1] * 30, -3.0),       # negative curvature dominates
    ([2.5, -2.45, 1.0, -0.5] + [0.05] * 31, 2.5),           # opposite signs of nearly equal size
    ([-1.0, -0.9, -0.2] + [-0.01] * 32, -1.0),              # a negative definite Hessian
])
def test_negative_curvature_gives_the_largest_magnitude(eigenvalues, top):
    a, _ = hessian(eigenvalues, seed=3)
    got = hessian_top_eigenvalue(QuadraticForm(a), DATA, mean_out, tol=1e-6)
    assert got == pytest.approx(top, rel=1e-5)


def test_a_budget_that_runs_out_returns_the_best_estimate():
    a, _ = hessian(spectrum_with_close_top(200), seed=4)
    got = hessian_top_eigenvalue(QuadraticForm(a), DATA, mean_out, iters=3, tol=1e-12)
    assert 0.01 < got <= 1.0 + 1e-9                                # a Rayleigh quotient, not yet converged


def test_start_and_restarts_are_checked():
    a, _ = hessian([1.0, 0.5, 0.2])
    model = QuadraticForm(a)
    with pytest.raises(ValueError, match="start has 2 entries; the model has 3"):
        hessian_top_eigenvalue(model, DATA, mean_out, start=torch.ones(2))
    with pytest.raises(ValueError, match="start must be a tensor"):
        hessian_top_eigenvalue(model, DATA, mean_out, start=[torch.ones(2)])
    with pytest.raises(ValueError, match="start must be finite and not all zero"):
        hessian_top_eigenvalue(model, DATA, mean_out, start=torch.zeros(3))
    with pytest.raises(ValueError, match="start must be finite"):
        hessian_top_eigenvalue(model, DATA, mean_out, start=torch.tensor([1.0, float("nan"), 0.0]))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="restarts must be an int >= 0"):
            hessian_top_eigenvalue(model, DATA, mean_out, restarts=bad)
