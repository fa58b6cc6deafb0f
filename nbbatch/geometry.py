"""The geometry of a trained network's loss around its weights: curvature, sharpness, paths.

- ``hessian_top_eigenvalue``: the largest-magnitude eigenvalue of the Hessian of the loss, by a
  Lanczos iteration on Hessian-vector products (double backward; the Hessian is never formed),
  stopped on the residual ``|Hv - lambda v| <= tol |lambda|`` and checked by a restart.
- ``sharpness``: Keskar et al. (2017), "On Large-Batch Training for Deep Learning: Generalization
  Gap and Sharp Minima": the largest loss increase within the box ``|z_i| <= eps (|w_i| + 1)``
  around the weights, as ``100 * (max f(w + z) - f(w)) / (1 + f(w))``. Keskar et al. solve the
  inner maximisation with L-BFGS-B; here it is a few steps of projected sign-gradient ascent from a
  random point of the box (the box's corners are where a sign step lands), which gives a lower
  bound of the same quantity.
- ``interpolate``: the loss and metrics along ``a * w1 + (1 - a) * w2`` (Goodfellow et al. 2015;
  Keskar et al. use a in [-1, 2] between the large- and small-batch solutions).
- ``distance_from`` and ``DistanceFromInit``: ``|w_t - w_0|`` (Hoffer et al. 2017 find it grows
  like log t), the latter recorded during training through a Trainer callback.

All functions evaluate the model in eval mode (no dropout, batch norm on its running
statistics), over the whole of the data given (in chunks of ``batch_size`` examples), and leave
the model's weights, buffers and train/eval mode exactly as they found them.
No maintained library offers these for an arbitrary ``nn.Module``, hence the hand-written code.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import train_tensors
from .checks import check_positive_int
from .losses import accuracy, resolve_loss

__all__ = ["DistanceFromInit", "distance_from", "hessian_top_eigenvalue", "interpolate", "sharpness"]


# ---------------------------------------------------------------------- input checks
def _check_model(model) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return params


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _chunks(x, y, batch_size: int, device):
    n = len(x)
    for i in range(0, n, batch_size):
        yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device), min(batch_size, n - i) / n


class _EvalMode:
    """Eval mode inside the block, the previous mode (module by module) after it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def _loss_and_grads(model, params, x, y, loss_fn, batch_size, device, create_graph=False):
    """Mean loss over all of (x, y) and its gradient, chunk by chunk (weights: chunk share of N)."""
    total = 0.0
    grads = [torch.zeros_like(p) for p in params]
    for xb, yb, share in _chunks(x, y, batch_size, device):
        loss = loss_fn(model(xb), yb) * share
        for acc, g in zip(grads, torch.autograd.grad(loss, params, create_graph=create_graph)):
            acc += g
        total += loss.item()
    return total, grads


@torch.no_grad()
def _mean_metrics(model, x, y, loss_fn, metrics, batch_size, device) -> dict[str, float]:
    sums = dict.fromkeys(["loss", *metrics], 0.0)
    for xb, yb, share in _chunks(x, y, batch_size, device):
        out = model(xb)
        sums["loss"] += float(loss_fn(out, yb)) * share
        for name, fn in metrics.items():
            sums[name] += float(fn(out, yb)) * share
    return sums


def _device(params) -> torch.device:
    return params[0].device


# ---------------------------------------------------------------------- curvature
def _lanczos_top(matvec: Callable, start: torch.Tensor, budget: int, tol: float, krylov: int,
                 fresh: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor, int, bool]:
    """The largest-magnitude Ritz pair of a symmetric operator by explicitly restarted Lanczos.

    Full reorthogonalisation against the basis (``krylov`` float64 vectors) keeps the basis
    orthonormal; a cycle restarts from its best Ritz vector. The Ritz pair ``(theta, y)`` has the
    residual ``|H y - theta y| = beta_j |s_j|`` (``s`` the eigenvector of the tridiagonal matrix);
    iteration stops when it is ``<= tol |theta|``. A basis that closes (an invariant subspace) goes
    on with a fresh random direction, so the search does not end inside a subspace the start spans.

    Returns:
        ``(theta, y, products used, converged)``.
    """
    used = 0
    v = start / start.norm()
    theta, y = math.nan, v
    store = torch.empty(krylov, len(v), dtype=v.dtype, device=v.device)   # the basis, one row per vector
    while used < budget:
        store[0] = v
        alpha, beta = [], []
        for j in range(krylov):
            w = matvec(store[j])
            used += 1
            alpha.append(float(store[j] @ w))
            V = store[:j + 1]                                   # (j + 1, P)
            for _ in range(2):                                  # "twice is enough" (Kahan, Parlett)
                w = w - V.T @ (V @ w)
            b = float(w.norm())
            t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
            if beta:
                off = torch.tensor(beta, dtype=torch.float64)
                t = t + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(t)
            k = int(evals.abs().argmax())
            theta, s = float(evals[k]), evecs[:, k].to(V.device)
            y = V.T @ s
            closed = b <= 1e-10 * max(float(evals.abs().max()), 1e-300)   # an invariant subspace
            if j + 1 == len(v) or (not closed and b * abs(float(s[-1])) <= tol * abs(theta)):
                return theta, y, used, True                     # converged, or the basis spans the space
            if used >= budget or j == krylov - 1:
                break
            if closed:
                # the Ritz values are eigenvalues, but maybe not the top one: go on in the rest of
                # the space with a fresh direction (the tridiagonal coupling is 0)
                w = fresh()
                for _ in range(2):
                    w = w - V.T @ (V @ w)
                b = float(w.norm())
                beta.append(0.0)
            else:
                beta.append(b)
            store[j + 1] = w / b
        v = y / y.norm()
    return theta, y, used, False


def hessian_top_eigenvalue(model: nn.Module, data, loss="cross_entropy", *, iters: int = 100,
                           tol: float = 1e-4, batch_size: int = 4096, seed: int = 0, start=None,
                           restarts: int = 1) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss, by Lanczos iteration.

    Each iteration is one Hessian-vector product ``Hv = d(g . v)/dw`` over all of ``data``
    (double backward; the Hessian is never formed), so the cost is about two backward passes per
    product. The products feed a Lanczos iteration (fully reorthogonalised, restarted every 20
    products; 20 float64 vectors of the parameters' size), which finds an extreme eigenvalue far
    faster than power iteration when the top two are close. It stops on the residual:
    ``|H v - lambda v| <= tol |lambda|`` for the Ritz pair ``(lambda, v)``, which bounds the distance
    of ``lambda`` to an eigenvalue of ``H`` by ``tol |lambda|``. A small residual does not prove that
    eigenvalue is the top one (a start nearly orthogonal to the top eigenvector can converge on the
    second first), so after convergence the search restarts ``restarts`` times from the converged
    vector mixed with a fresh random one and keeps the largest magnitude found. With a budget of
    ``iters`` products that runs out first, the best estimate so far is returned.

    Near a minimum the Hessian is (nearly) positive semi-definite and this is the top eigenvalue,
    the usual curvature measure; where the curvature is negative and larger in magnitude, the result
    is that negative eigenvalue.

    Args:
        model: the network (its weights, buffers and mode are left as they were).
        data: ``(x, y)`` tensors, a TensorDataset or a DataBundle (training split).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``loss(output, target)`` returning a batch mean.
        iters: most Hessian-vector products in all, >= 1.
        tol: relative residual at which to stop, > 0.
        batch_size: examples per chunk (memory only; the result does not depend on it).
        seed: seed of the random start vector and of the restarts' random vectors.
        start: the start vector (None: random), a tensor with one entry per trainable parameter
            entry, or a sequence of tensors shaped like the trainable parameters.
        restarts: checks by a restart after convergence, >= 0.

    Example:
        >>> _ = torch.manual_seed(0); x = torch.randn(100, 3); model = nn.Linear(3, 1, bias=False)
        >>> mse = lambda out, y: F.mse_loss(out.squeeze(-1), y)      # Hessian 2 X^T X / N
        >>> lam = hessian_top_eigenvalue(model, (x, torch.zeros(100)), mse)
        >>> exact = torch.linalg.eigvalsh(2 * x.T @ x / 100).max().item()
        >>> abs(lam - exact) < 1e-3 * exact
        True
    """
    params = _check_model(model)
    loss_fn = resolve_loss(loss)
    x, y = train_tensors(data)
    check_positive_int("iters", iters)
    _check_positive("tol", tol)
    check_positive_int("batch_size", batch_size)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"restarts must be an int >= 0, got {restarts!r}")
    device = _device(params)
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if start is not None:
        if isinstance(start, torch.Tensor):
            flat = start.detach().reshape(-1)
        elif isinstance(start, (list, tuple)) and len(start) == len(params) and all(
                isinstance(t, torch.Tensor) and t.shape == p.shape for t, p in zip(start, params)):
            flat = torch.cat([t.detach().reshape(-1) for t in start])
        else:
            raise ValueError("start must be a tensor with one entry per trainable parameter entry or a sequence "
                             "of tensors shaped like the trainable parameters")
        if flat.numel() != total:
            raise ValueError(f"start has {flat.numel()} entries; the model has {total} trainable parameter entries")
        flat = flat.to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(flat).all()) or float(flat.norm()) == 0.0:
            raise ValueError("start must be finite and not all zero")
    gen = torch.Generator().manual_seed(int(seed))

    def fresh() -> torch.Tensor:
        return torch.randn(total, generator=gen, dtype=torch.float64).to(device)

    def hvp(v: torch.Tensor) -> torch.Tensor:        # (P,) float64 -> (P,) float64
        parts = [u.view_as(p).to(p.dtype) for u, p in zip(v.split(sizes), params)]
        hv = [torch.zeros_like(p) for p in params]
        for xb, yb, share in _chunks(x, y, batch_size, device):
            loss = loss_fn(model(xb), yb) * share
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, parts))
            for acc, h in zip(hv, torch.autograd.grad(dot, params)):
                acc += h
        return torch.cat([h.reshape(-1) for h in hv]).double()

    v = fresh() if start is None else flat
    krylov = min(total, 20)
    best, budget = None, iters
    with _EvalMode(model):
        for attempt in range(restarts + 1):
            theta, vec, used, converged = _lanczos_top(hvp, v, budget, tol, krylov, fresh)
            budget -= used
            if best is None or abs(theta) > abs(best):
                best = theta
            if not converged or budget <= 0:
                break
            # check: the converged vector plus an equal share of a random one (which has a typical
            # overlap with every eigenvector) converges on a larger eigenvalue if there is one
            r = fresh()
            v = vec / vec.norm() + r / r.norm()
            if float(v.norm()) < 1e-8:
                v = r
    return float(best)


# ---------------------------------------------------------------------- sharpness
def sharpness(model: nn.Module, data, loss="cross_entropy", *, eps: float = 1e-3,
              iters: int = 20, step_size: float | None = None, batch_size: int = 4096,
              seed: int = 0) -> dict[str, float]:
    """Keskar et al.'s eps-sharpness: ``100 * (max_{z in C} f(w + z) - f(w)) / (1 + f(w))``.

    The box is ``C = {z : |z_i| <= eps * (|w_i| + 1)}`` in the full parameter space (Keskar's
    ``A = I`` case). The maximum is sought by projected ascent: start at a uniformly random point
    of the box, step ``z <- clip(z + step_size * r * sign(grad), -r, r)`` (``r`` the box's
    half-widths) and keep the largest loss seen. The result is a lower bound of the true maximum.

    Args:
        model: the network at the solution (weights, buffers and mode are restored).
        data: ``(x, y)`` tensors, a TensorDataset or a DataBundle (training split); Keskar et
            al. measure on the training set.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``loss(output, target)`` returning a batch mean.
        eps: relative radius of the box, > 0 (Keskar et al. report 1e-3 and 5e-4).
        iters: ascent iterations, >= 1.
        step_size: step as a fraction of the box's half-width, > 0; default ``2.5 / iters``.
        batch_size: examples per chunk (memory only).
        seed: seed of the random start in the box.

    Returns:
        ``{"sharpness": ..., "loss": f(w), "max_loss": max f(w + z)}``.

    Example:
        >>> _ = torch.manual_seed(0); model = nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64)
        >>> mse = lambda out, y: F.mse_loss(out.squeeze(-1), y)
        >>> s = sharpness(model, (x, y), mse, eps=1e-3)
        >>> s["max_loss"] > s["loss"] and s["sharpness"] > 0
        True
    """
    params = _check_model(model)
    loss_fn = resolve_loss(loss)
    x, y = train_tensors(data)
    _check_positive("eps", eps)
    check_positive_int("iters", iters)
    alpha = 2.5 / iters if step_size is None else _check_positive("step_size", step_size)
    check_positive_int("batch_size", batch_size)
    device = _device(params)
    original = [p.detach().clone() for p in params]
    radius = [eps * (w.abs() + 1.0) for w in original]
    gen = torch.Generator().manual_seed(int(seed))
    z = [(torch.rand(w.shape, generator=gen, dtype=w.dtype).to(device) * 2 - 1) * r
         for w, r in zip(original, radius)]
    with _EvalMode(model):
        try:
            with torch.no_grad():
                base = _mean_metrics(model, x, y, loss_fn, {}, batch_size, device)["loss"]
            best = base
            for _ in range(iters):
                with torch.no_grad():
                    for p, w, dz in zip(params, original, z):
                        p.copy_(w + dz)
                loss, grads = _loss_and_grads(model, params, x, y, loss_fn, batch_size, device)
                best = max(best, loss)
                with torch.no_grad():
                    for dz, g, r in zip(z, grads, radius):
                        dz.add_(alpha * r * torch.sign(g))
                        torch.minimum(torch.maximum(dz, -r), r, out=dz)
            with torch.no_grad():
                for p, w, dz in zip(params, original, z):
                    p.copy_(w + dz)
                best = max(best, _mean_metrics(model, x, y, loss_fn, {}, batch_size, device)["loss"])
        finally:
            with torch.no_grad():
                for p, w in zip(params, original):
                    p.copy_(w)
    return {"sharpness": 100.0 * (best - base) / (1.0 + base), "loss": base, "max_loss": best}


# ---------------------------------------------------------------------- interpolation
def _state_of(weights, name: str) -> dict:
    # Copies: the vessel model may be w1 or w2 itself (or share its tensors), and is overwritten below.
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    if isinstance(weights, Mapping):
        return {k: torch.as_tensor(v).detach().clone() for k, v in weights.items()}
    raise TypeError(f"{name} must be an nn.Module or a state_dict, got {type(weights).__name__}")


def interpolate(model: nn.Module, w1, w2, data, eval_data=None, *, alphas: Sequence[float] | None = None,
                loss="cross_entropy", metrics: Mapping[str, Callable] | None = None,
                batch_size: int = 4096) -> dict[str, list]:
    """Loss and metrics of ``model`` with weights ``a * w1 + (1 - a) * w2`` for each ``a`` in ``alphas``.

    ``a = 0`` gives ``w2``, ``a = 1`` gives ``w1``; Keskar et al. (2017) plot ``a`` in [-1, 2]
    with ``w1`` the large-batch and ``w2`` the small-batch solution. Every floating-point
    entry of the state dict is interpolated (batch-norm running statistics included); integer
    buffers come from ``w1``. The model's own state and mode are restored afterwards.

    Args:
        model: a network of the architecture of ``w1`` and ``w2`` (used as the vessel).
        w1, w2: ``nn.Module``s or state dicts.
        data: ``(x, y)``, a TensorDataset or a DataBundle; for a DataBundle its test split is
            used as ``eval_data`` unless one is given.
        eval_data: a second set, reported as ``test_*`` columns (optional).
        alphas: the values of ``a``; default 31 points evenly spaced on [-1, 2].
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``loss(output, target)`` returning a batch mean.
        metrics: ``{name: fn(output, target) -> batch mean}``; default accuracy with cross-entropy.
        batch_size: examples per evaluation chunk.

    Returns:
        ``{"alpha": [...], "train_loss": [...], "train_<metric>": [...], "test_loss": ..., ...}``.

    Example:
        >>> _ = torch.manual_seed(0); a, b = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
        >>> r = interpolate(nn.Linear(4, 3), a, b, (x, y), alphas=[0.0, 0.5, 1.0])
        >>> r["alpha"], sorted(r)
        ([0.0, 0.5, 1.0], ['alpha', 'train_accuracy', 'train_loss'])
    """
    params = _check_model(model)
    loss_fn = resolve_loss(loss)
    if eval_data is None and hasattr(data, "x_test") and getattr(data, "x_test", None) is not None and len(data.x_test):
        eval_data = (data.x_test, data.y_test)
    sets = {"train": train_tensors(data)}
    if eval_data is not None:
        sets["test"] = train_tensors(eval_data, "eval_data")
    alphas = [float(a) for a in (torch.linspace(-1.0, 2.0, 31).tolist() if alphas is None else alphas)]
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of finite numbers, got {alphas!r}")
    check_positive_int("batch_size", batch_size)
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is F.cross_entropy else {}
    s1, s2 = _state_of(w1, "w1"), _state_of(w2, "w2")
    own = model.state_dict()
    for name, s in (("w1", s1), ("w2", s2)):
        if s.keys() != own.keys() or any(s[k].shape != own[k].shape for k in own):
            raise ValueError(f"{name} does not match the model's parameters and buffers (names or shapes differ)")
    saved = copy.deepcopy(own)
    device = _device(params)
    out: dict[str, list] = {"alpha": []}
    with _EvalMode(model):
        try:
            for a in alphas:
                mixed = {k: (a * s1[k].to(device) + (1 - a) * s2[k].to(device)) if s1[k].is_floating_point()
                         else s1[k] for k in own}
                model.load_state_dict(mixed)
                out["alpha"].append(a)
                for split, (x, y) in sets.items():
                    for name, value in _mean_metrics(model, x, y, loss_fn, metrics, batch_size, device).items():
                        out.setdefault(f"{split}_{name}", []).append(value)
        finally:
            model.load_state_dict(saved)
    return out


# ---------------------------------------------------------------------- distance from init
@torch.no_grad()
def distance_from(model: nn.Module, reference) -> float:
    """Euclidean distance ``|w - w_ref|`` over all parameters of ``model``.

    Args:
        model: the network now.
        reference: a network of the same architecture, or a list of tensors in
            ``model.parameters()`` order (as ``[p.detach().clone() for p in model.parameters()]``).

    Example:
        >>> m = nn.Linear(2, 1); w0 = [p.detach().clone() for p in m.parameters()]
        >>> with torch.no_grad(): m.weight += torch.tensor([[3.0, 4.0]])
        >>> distance_from(m, w0)
        5.0
    """
    params = list(model.parameters())
    ref = list(reference.parameters()) if isinstance(reference, nn.Module) else list(reference)
    if len(ref) != len(params) or any(p.shape != r.shape for p, r in zip(params, ref)):
        raise ValueError("reference does not match the model's parameters (count or shapes differ)")
    diffs = torch._foreach_sub([p.detach() for p in params], [r.to(p.device) for p, r in zip(params, ref)])
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))   # one sync


class DistanceFromInit:
    """Record ``|w_t - w_0|`` during training, every ``every`` optimizer steps.

    Attaching snapshots the model's parameters as ``w_0`` (or takes ``init``) and registers a
    ``step_end`` callback on the trainer; ``steps`` and ``distances`` grow as it trains.
    ``detach()`` stops recording. The cost is one pass over the parameters and one host sync per
    recorded step. The record is not part of the trainer's checkpoint: after ``Trainer.load``,
    pass the initial weights as ``init`` to keep measuring from them.

    Args:
        trainer: an ``nbbatch.Trainer`` (anything with ``model``, ``step_count`` and
            ``add_callback``).
        every: record every this many steps, >= 1.
        init: ``w_0`` as a network of the same architecture or a list of tensors in
            ``model.parameters()`` order; default the model's weights now.

    Example:
        >>> from nbbatch import Trainer
        >>> _ = torch.manual_seed(0); x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> t = Trainer(nn.Linear(4, 3), (x, y), batch_size=16, lr=0.1)
        >>> d = DistanceFromInit(t, every=2)
        >>> _ = t.fit(steps=6)
        >>> d.steps, d.distances[-1] > d.distances[0] > 0
        ([2, 4, 6], True)
    """

    def __init__(self, trainer, every: int = 1, init=None):
        check_positive_int("every", every)
        if not hasattr(trainer, "add_callback") or not isinstance(getattr(trainer, "model", None), nn.Module):
            raise TypeError(f"trainer must be an nbbatch Trainer, got {type(trainer).__name__}")
        if init is None:
            init = trainer.model
        ref = list(init.parameters()) if isinstance(init, nn.Module) else list(init)
        if len(ref) != len(list(trainer.model.parameters())) or any(
                p.shape != r.shape for p, r in zip(trainer.model.parameters(), ref)):
            raise ValueError("init does not match the model's parameters (count or shapes differ)")
        self.trainer, self.every = trainer, every
        self.init = [r.detach().clone() for r in ref]
        self.steps: list[int] = []
        self.distances: list[float] = []
        trainer.add_callback("step_end", self._on_step)

    def _on_step(self, trainer, row) -> None:
        if trainer.step_count % self.every == 0:
            self.steps.append(trainer.step_count)
            self.distances.append(distance_from(trainer.model, self.init))

    def detach(self) -> None:
        """Stop recording (removes the callback)."""
        self.trainer.remove_callback("step_end", self._on_step)
