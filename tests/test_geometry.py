import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from helpers import make_mlp, requires_cuda, same_weights
from nbbatch import Trainer
from nbbatch.geometry import DistanceFromInit, distance_from, hessian_top_eigenvalue, interpolate, sharpness


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


class Quadratic(nn.Module):
    """f(w) = sum_i a_i (w_i - c_i)^2 + b . w, returned for every example (the inputs are ignored)."""

    def __init__(self, a, c, b=None):
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float64))
        self.register_buffer("c", torch.as_tensor(c, dtype=torch.float64))
        self.register_buffer("b", torch.zeros_like(self.a) if b is None else torch.as_tensor(b, dtype=torch.float64))
        self.w = nn.Parameter(self.c.clone())

    def forward(self, x):
        value = (self.a * (self.w - self.c) ** 2).sum() + (self.b * self.w).sum()
        return value.expand(len(x))


def mean_out(out, y):
    return out.mean()


def dummy(n=10):
    return torch.zeros(n, 1), torch.zeros(n)


# ---------------------------------------------------------------------------- Hessian
def test_top_eigenvalue_of_a_quadratic_with_known_hessian():
    a = torch.tensor([0.5, 3.0, -1.0, 2.0])                  # Hessian diag(2a): largest magnitude 6
    model = Quadratic(a, torch.randn(4, generator=torch.Generator().manual_seed(0)))
    lam = hessian_top_eigenvalue(model, dummy(), mean_out, tol=1e-8)
    assert lam == pytest.approx(6.0, rel=1e-5)


def test_top_eigenvalue_of_least_squares_is_that_of_2xtx_over_n_and_chunking_does_not_matter():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g) * torch.tensor([3.0, 1, 1, 1, 0.5, 0.1])
    y = torch.randn(300, generator=g)
    model = nn.Linear(6, 1, bias=False)
    exact = torch.linalg.eigvalsh(2 * x.T @ x / 300).max().item()
    whole = hessian_top_eigenvalue(model, (x, y), mse, tol=1e-9)
    chunked = hessian_top_eigenvalue(model, (x, y), mse, tol=1e-9, batch_size=7)
    assert whole == pytest.approx(exact, rel=1e-5)
    assert chunked == pytest.approx(exact, rel=1e-5)


def test_top_eigenvalue_of_a_network_matches_the_full_hessian():
    """A small tanh network: the full Hessian from torch.autograd.functional.hessian is the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat0))
    top = eig[eig.abs().argmax()].item()
    before = copy.deepcopy(model)
    model.train()
    lam = hessian_top_eigenvalue(model, (x, y), tol=1e-10, iters=500)
    assert lam == pytest.approx(top, rel=1e-4)
    assert same_weights(model, before) and model.training


def test_eigenvalue_is_evaluated_in_eval_mode():
    """Dropout would make the Hessian random: eval mode makes two calls agree exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    assert hessian_top_eigenvalue(model, (x, y), iters=5) == hessian_top_eigenvalue(model, (x, y), iters=5)


# ---------------------------------------------------------------------------- sharpness
def test_sharpness_at_the_minimum_of_a_quadratic_reaches_the_box_corner():
    a, c = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    model = Quadratic(a, c)
    eps = 1e-2
    r = eps * (c.abs() + 1)
    expected = 100 * float((a * r ** 2).sum()) / (1 + 0.0)
    s = sharpness(model, dummy(), mean_out, eps=eps, iters=10)
    assert s["loss"] == pytest.approx(0.0, abs=1e-12)
    assert s["sharpness"] == pytest.approx(expected, rel=1e-9)
    assert torch.equal(model.w.detach(), c.double())          # the weights are put back


def test_sharpness_of_a_linear_loss_is_the_l1_norm_over_the_box():
    b, c = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    model = Quadratic(torch.zeros(3), c, b)                   # f(w) = b . w = 6 + 1 + 1 = 8
    eps = 1e-3
    r = eps * (c.abs() + 1)
    s = sharpness(model, dummy(), mean_out, eps=eps, iters=5)
    assert s["loss"] == pytest.approx(8.0)
    assert s["max_loss"] == pytest.approx(8.0 + float((b.abs() * r).sum()), rel=1e-12)
    assert s["sharpness"] == pytest.approx(100 * float((b.abs() * r).sum()) / 9.0, rel=1e-9)


def test_sharpness_restores_the_network_and_is_nonnegative():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    state = copy.deepcopy(model.state_dict())
    s = sharpness(model, (x, y), eps=1e-2, iters=3)
    assert s["sharpness"] >= 0 and s["max_loss"] >= s["loss"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())   # BN stats untouched too
    assert model.training


# ---------------------------------------------------------------------------- interpolation
def test_interpolation_endpoints_and_quadratic_path():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(80, 5, generator=g), torch.randn(80, generator=g)
    xt, yt = torch.randn(30, 5, generator=g), torch.randn(30, generator=g)
    m1, m2, vessel = nn.Linear(5, 1), nn.Linear(5, 1), nn.Linear(5, 1)
    before = copy.deepcopy(vessel)
    alphas = [-1.0, 0.0, 0.5, 1.0, 2.0]
    r = interpolate(vessel, m1, m2, (x, y), (xt, yt), alphas=alphas, loss=mse)
    assert sorted(r) == ["alpha", "test_loss", "train_loss"]
    assert r["alpha"] == alphas
    for i, a in enumerate(alphas):
        w = a * m1.weight + (1 - a) * m2.weight
        b = a * m1.bias + (1 - a) * m2.bias
        assert r["train_loss"][i] == pytest.approx(mse(x @ w.T + b, y).item(), rel=1e-5)
        assert r["test_loss"][i] == pytest.approx(mse(xt @ w.T + b, yt).item(), rel=1e-5)
    assert same_weights(vessel, before)


def test_interpolation_of_a_classifier_reports_accuracy_and_uses_the_bundle_test_split():
    class Bundle:
        pass

    g = torch.Generator().manual_seed(0)
    d = Bundle()
    d.x_train, d.y_train = torch.randn(60, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    d.x_test, d.y_test = torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    m1, m2 = make_mlp(seed=1), make_mlp(seed=2)
    r = interpolate(make_mlp(seed=3), m1.state_dict(), m2, d)
    assert len(r["alpha"]) == 31 and r["alpha"][0] == -1.0 and r["alpha"][-1] == 2.0
    i1 = r["alpha"].index(1.0)
    m1.eval()
    with torch.no_grad():
        out = m1(d.x_test)
    assert r["test_loss"][i1] == pytest.approx(F.cross_entropy(out, d.y_test).item(), rel=1e-5)
    assert r["test_accuracy"][i1] == pytest.approx((out.argmax(1) == d.y_test).float().mean().item())


def test_interpolation_may_use_one_of_the_two_models_as_the_vessel():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    m1, m2 = make_mlp(seed=1), make_mlp(seed=2)
    expected = interpolate(make_mlp(), m1, m2, (x, y), alphas=[-0.5, 0.0, 0.7, 1.0])
    before = copy.deepcopy(m2)
    assert interpolate(m2, m1, m2, (x, y), alphas=[-0.5, 0.0, 0.7, 1.0]) == expected
    assert same_weights(m2, before)


def test_interpolation_rejects_mismatched_weights_and_empty_alphas():
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="w2"):
        interpolate(make_mlp(), make_mlp(), make_mlp(hidden=5), (x, y))
    with pytest.raises(ValueError, match="alphas"):
        interpolate(make_mlp(), make_mlp(), make_mlp(), (x, y), alphas=[])
    with pytest.raises(TypeError, match="w1"):
        interpolate(make_mlp(), [1, 2], make_mlp(), (x, y))


# ---------------------------------------------------------------------------- distance from init
def test_distance_after_one_sgd_step_is_lr_times_gradient_norm(toy):
    x, y = toy
    model = make_mlp()
    ref = copy.deepcopy(model)
    t = Trainer(model, (x, y), batch_size=len(x), lr=0.3, optimizer="sgd", seed=0)
    d = DistanceFromInit(t)
    t.step()
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    gnorm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    assert d.steps == [1]
    assert d.distances[0] == pytest.approx(0.3 * gnorm, rel=1e-5)


def test_distance_is_recorded_every_k_steps_and_detach_stops_it(toy):
    x, y = toy
    model = make_mlp()
    init = [p.detach().clone() for p in model.parameters()]
    t = Trainer(model, (x, y), batch_size=20, lr=0.1, optimizer="momentum", seed=0)
    d = DistanceFromInit(t, every=3)
    t.fit(steps=10)
    assert d.steps == [3, 6, 9]
    t.fit(steps=2)
    assert d.steps[-1] == 12 and d.distances[-1] == pytest.approx(distance_from(model, init))
    d.detach()
    t.fit(steps=3)
    assert d.steps[-1] == 12


def test_distance_continues_from_given_init_after_a_resume(toy, tmp_path):
    x, y = toy
    model = make_mlp()
    init = [p.detach().clone() for p in model.parameters()]
    t = Trainer(model, (x, y), batch_size=20, lr=0.1, optimizer="momentum", seed=0)
    full = DistanceFromInit(t)
    t.fit(steps=4)
    t.save(tmp_path / "ck.pt")
    t.fit(steps=3)
    resumed = Trainer.load(tmp_path / "ck.pt", make_mlp(seed=9), (x, y))
    again = DistanceFromInit(resumed, init=init)
    resumed.fit(steps=3)
    assert again.steps == full.steps[4:] == [5, 6, 7]
    assert again.distances == pytest.approx(full.distances[4:], rel=1e-6)


def test_distance_errors():
    with pytest.raises(ValueError, match="reference"):
        distance_from(make_mlp(), make_mlp(hidden=4))
    with pytest.raises(ValueError, match="every"):
        DistanceFromInit(object(), every=0)
    with pytest.raises(TypeError, match="trainer"):
        DistanceFromInit(object())
    t = Trainer(make_mlp(), (torch.randn(10, 8), torch.zeros(10, dtype=torch.long)), batch_size=5)
    with pytest.raises(ValueError, match="init"):
        DistanceFromInit(t, init=make_mlp(hidden=4))
    assert t._callbacks["step_end"] == []                       # nothing registered on failure


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn,kwargs,match", [
    (hessian_top_eigenvalue, {"iters": 0}, "iters"),
    (hessian_top_eigenvalue, {"tol": -1.0}, "tol"),
    (hessian_top_eigenvalue, {"batch_size": 0}, "batch_size"),
    (sharpness, {"eps": 0.0}, "eps"),
    (sharpness, {"eps": float("inf")}, "eps"),
    (sharpness, {"iters": 0}, "iters"),
    (sharpness, {"loss": "l1"}, "loss=.l1. is not known"),
    (sharpness, {"step_size": -0.5}, "step_size"),
])
def test_bad_arguments_name_the_parameter(fn, kwargs, match):
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match=match):
        fn(make_mlp(), (x, y), **kwargs)


def test_bad_data_and_model():
    with pytest.raises(ValueError, match="labels"):
        sharpness(make_mlp(), (torch.randn(10, 8), torch.zeros(9, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        hessian_top_eigenvalue(make_mlp(), (torch.randn(0, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(TypeError, match="data"):
        hessian_top_eigenvalue(make_mlp(), torch.randn(10, 8))
    with pytest.raises(TypeError, match="model"):
        sharpness("net", (torch.randn(10, 8), torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="parameters"):
        sharpness(nn.ReLU(), (torch.randn(10, 8), torch.zeros(10, dtype=torch.long)))


@requires_cuda
def test_cuda_geometry_matches_the_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    gpu = copy.deepcopy(model).cuda()
    lam_cpu = hessian_top_eigenvalue(model, (x, y), tol=1e-8, iters=300)
    lam_gpu = hessian_top_eigenvalue(gpu, (x, y), tol=1e-8, iters=300)
    assert lam_gpu == pytest.approx(lam_cpu, rel=1e-3)
    s_cpu, s_gpu = sharpness(model, (x, y), eps=1e-2), sharpness(gpu, (x, y), eps=1e-2)
    assert s_gpu["loss"] == pytest.approx(s_cpu["loss"], rel=1e-4)
    assert distance_from(gpu, model) == pytest.approx(0.0, abs=1e-6)
    r = interpolate(gpu, model, gpu, (x, y), alphas=[0.0, 1.0])
    assert r["train_loss"][0] == pytest.approx(r["train_loss"][1], rel=1e-4)


def test_loss_is_a_name_or_a_callable_in_every_function():
    """``loss=`` takes what TrainConfig's does: a name resolved by nbbatch.losses, or a callable."""
    from nbbatch.losses import mse_loss

    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    x, y = torch.randn(30, 4), torch.randn(30)
    by_name = interpolate(nn.Linear(4, 1), a, b, (x, y), alphas=[0.0, 1.0], loss="mse")
    by_fn = interpolate(nn.Linear(4, 1), a, b, (x, y), alphas=[0.0, 1.0], loss=mse_loss)
    assert by_name == by_fn and sorted(by_name) == ["alpha", "train_loss"]      # no accuracy for mse
    assert by_name["train_loss"][1] == pytest.approx(F.mse_loss(a(x).squeeze(-1), y).item())
    assert hessian_top_eigenvalue(a, (x, y), "mse", iters=30) == pytest.approx(
        hessian_top_eigenvalue(a, (x, y), mse_loss, iters=30))
    for fn, args in ((interpolate, (a, b, (x, y))), (sharpness, ((x, y),)), (hessian_top_eigenvalue, ((x, y),))):
        with pytest.raises(ValueError, match="loss='l1' is not known"):
            fn(nn.Linear(4, 1), *args, loss="l1")
