"""Batch-size diagnostics: the gradient noise scale, steps-to-target sweeps and the critical batch,
and a learning-rate range test.

* Gradient noise scale (McCandlish et al. 2018), ``B_simple = tr(Sigma) / |G|^2``:

  - ``gradient_noise_scale``: exact, from per-example gradients (``torch.func`` ``vmap`` over
    ``grad``) over all training examples or a sample of them;
  - ``two_batch_estimate`` / ``NoiseScaleEMA`` / ``noise_scale_two_batch``: McCandlish's unbiased
    estimator from squared gradient norms at a small and a big batch, numerator and denominator
    smoothed separately before dividing;
  - ``OnlineNoiseScale``: the same estimator inside ``Trainer`` steps (``noise_scale_every=``),
    from the first micro-batch against the whole batch.

* ``sweep``: steps and examples to reach a target per batch size, with the best learning rate per
  batch size from a grid or a scaling rule; ``fit_critical_batch`` fits ``S = S_min + E_min/B``
  (McCandlish et al. 2018; Shallue et al. 2019) and gives ``B_crit = E_min / S_min``.

* ``lr_find``: an LR range test (Smith 2017) on a Trainer that leaves its model, optimizer,
  gradients, random state and progress exactly as they were.

Written by hand because no maintained library offers these estimators; per-example gradients
come from ``torch.func`` and the constrained fit from ``scipy.optimize.nnls``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "NoiseScale", "gradient_noise_scale", "two_batch_estimate", "NoiseScaleEMA", "noise_scale_two_batch",
    "OnlineNoiseScale", "CriticalBatchFit", "fit_critical_batch", "SweepResult", "sweep",
    "LRFinderResult", "lr_find", "smoothed_noise_scale",
]


# ---------------------------------------------------------------------- input checks
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_smoothing(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"smoothing must be a number in [0, 1) (the EMA's weight on the past), got {value!r}")
    return float(value)


def _train_tensors(data, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a DataBundle (its training split), a pair of tensors or a TensorDataset."""
    from .batching import as_tensors

    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        x, y = data.x_train, data.y_train
    else:
        xy = as_tensors(data)
        if xy is None:
            raise TypeError(f"{name} must be a DataBundle, a pair (x, y) of tensors or a TensorDataset, "
                            f"got {type(data).__name__}")
        x, y = xy
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    return x, y


def _loss_fn(loss) -> Callable:
    from .trainer import _resolve_loss

    if isinstance(loss, str) and loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss={loss!r} is not known; use 'cross_entropy', 'mse' or a callable(output, target)")
    if not isinstance(loss, str) and not callable(loss):
        raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
    return _resolve_loss(loss)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None


# ---------------------------------------------------------------------- noise scale
@dataclass(frozen=True)
class NoiseScale:
    """A gradient noise scale measurement.

    Attributes:
        b_simple: ``trace / grad_sq``, McCandlish's simple noise scale (examples); ``inf`` when
            ``grad_sq <= 0`` (the noise swamps the signal at any batch the estimate can see).
        trace: estimate of ``tr(Sigma)``, the trace of the per-example gradient covariance.
        grad_sq: estimate of ``|G|^2``, the squared norm of the full-batch gradient.
        examples: examples the estimate used (the sample size, or draws x batch sizes).
    """

    b_simple: float
    trace: float
    grad_sq: float
    examples: int

    @staticmethod
    def of(trace: float, grad_sq: float, examples: int) -> "NoiseScale":
        b = trace / grad_sq if grad_sq > 0 else math.inf
        return NoiseScale(float(b), float(trace), float(grad_sq), int(examples))


def gradient_noise_scale(model: nn.Module, data, *, loss="cross_entropy", sample: int | None = None,
                         chunk_size: int = 256, seed: int = 0) -> NoiseScale:
    """The simple noise scale ``B_simple = tr(Sigma)/|G|^2`` from per-example gradients.

    Per-example gradients ``g_i`` come from ``torch.func`` (``vmap`` over ``grad``), ``chunk_size``
    examples at a time; only their running sum and sum of squares are kept (float64), so memory is
    ``chunk_size x parameters``. With ``sample=None`` every example is used and the values are
    exact for the data set: ``G`` the mean gradient, ``tr(Sigma) = mean |g_i - G|^2``. With
    ``sample=n`` a seeded random subset of ``n`` examples gives unbiased estimates of both
    (``tr(Sigma)`` with ``n - 1``, and ``|G|^2 = |mean g|^2 - tr(Sigma)/n``).

    The model is evaluated in eval mode (no dropout; batch norm uses its running statistics, as a
    single example has no batch statistics) and restored afterwards; nothing is updated.

    Args:
        model: the model at the weights to measure.
        data: a DataBundle (its training split), a pair ``(x, y)`` or a TensorDataset.
        loss: ``"cross_entropy"``, ``"mse"`` or ``loss(output, target)`` returning a batch mean.
        sample: number of examples to draw (None: all of them); at least 2.
        chunk_size: examples per vectorised chunk (memory only).
        seed: seed of the sample.

    Example:
        >>> _ = torch.manual_seed(0); x = torch.randn(500, 3); y = x @ torch.ones(3)
        >>> model = nn.Linear(3, 1, bias=False)
        >>> ns = gradient_noise_scale(model, (x, y), loss="mse")
        >>> ns.b_simple > 1, ns.examples
        (True, 500)
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _train_tensors(data)
    loss_fn = _loss_fn(loss)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    n_all = len(x)
    if sample is not None:
        _check_positive_int("sample", sample)
        if sample < 2 or sample > n_all:
            raise ValueError(f"sample={sample} must lie in [2, {n_all}] (the examples in data)")
    elif n_all < 2:
        raise ValueError("data needs at least 2 examples to measure a gradient covariance")
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    device = _device_of(model)
    if sample is not None and sample < n_all:
        idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:sample]
        x, y = x[idx], y[idx]
    n = len(x)

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, {**p, **frozen, **buffers}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = None                                   # sum_i g_i, (P,) float64
    total_sq = torch.zeros((), dtype=torch.float64, device=device)   # sum_i |g_i|^2
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, chunk_size):
            g = per_example(params, x[i:i + chunk_size].to(device), y[i:i + chunk_size].to(device))
            flat = torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1).double()  # (chunk, P)
            s = flat.sum(0)
            total = s if total is None else total + s
            total_sq += (flat * flat).sum()
    finally:
        model.train(was_training)
    mean = total / n
    mean_sq = float((mean * mean).sum())
    # sum |g_i - mean|^2 = sum |g_i|^2 - n |mean|^2 (float64 keeps the difference accurate)
    scatter = max(float(total_sq) - n * mean_sq, 0.0)
    if n == n_all and sample is None:
        return NoiseScale.of(scatter / n, mean_sq, n)
    trace = scatter / (n - 1)
    return NoiseScale.of(trace, mean_sq - trace / n, n)


def two_batch_estimate(sq_small, sq_big, b_small: int, b_big: int) -> tuple:
    """McCandlish's unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from two squared gradient norms.

    With ``|g_B|^2`` the squared norm of a mean gradient over ``B`` examples,
    ``E|g_B|^2 = |G|^2 + tr(Sigma)/B``; two batch sizes give two equations:

        |G|^2     ~ (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
        tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1/b_small - 1/b_big)

    Single estimates are noisy and either may be negative; average (or ``NoiseScaleEMA``) many of
    them before dividing. Works elementwise on floats or tensors.

    Args:
        sq_small, sq_big: squared norms of the gradients of a small and a big batch.
        b_small, b_big: their batch sizes, ``b_small < b_big``.

    Returns:
        ``(grad_sq, trace)``.

    Example:
        >>> two_batch_estimate(1.0 + 20.0 / 4, 1.0 + 20.0 / 64, 4, 64)   # |G|^2 = 1, tr(Sigma) = 20
        (1.0, 20.0)
    """
    for name, value in (("b_small", b_small), ("b_big", b_big)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if b_small == b_big:
        raise ValueError(f"b_small and b_big are equal ({b_small}); the estimator needs two different batch sizes")
    if b_small > b_big:
        raise ValueError(f"b_small={b_small} is larger than b_big={b_big}; pass the smaller batch size first")
    grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


class NoiseScaleEMA:
    """Exponential moving averages of ``|G|^2`` and ``tr(Sigma)``, kept separately, and their ratio.

    Dividing two noisy unbiased estimates step by step gives a biased, heavy-tailed ratio;
    McCandlish et al. average numerator and denominator first. The averages are bias-corrected
    like Adam's, so the first update is not pulled towards zero.

    Args:
        smoothing: weight of the past in each update, in [0, 1) (0: no smoothing).

    Example:
        >>> ema = NoiseScaleEMA(0.5)
        >>> ema.update(1.0, 10.0), round(ema.update(3.0, 30.0), 6)
        (10.0, 10.0)
        >>> round(ema.grad_sq, 4), round(ema.trace, 4)
        (2.3333, 23.3333)
    """

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = _check_smoothing(smoothing)
        self.count = 0
        self._g = 0.0
        self._t = 0.0

    def update(self, grad_sq: float, trace: float) -> float:
        """Add one pair of estimates; returns the smoothed ``b_simple``."""
        a = self.smoothing
        self._g = a * self._g + (1.0 - a) * float(grad_sq)
        self._t = a * self._t + (1.0 - a) * float(trace)
        self.count += 1
        return self.b_simple

    @property
    def grad_sq(self) -> float:
        return self._g / (1.0 - self.smoothing ** self.count) if self.count else math.nan

    @property
    def trace(self) -> float:
        return self._t / (1.0 - self.smoothing ** self.count) if self.count else math.nan

    @property
    def b_simple(self) -> float:
        """``trace / grad_sq`` of the averages (``inf`` while the averaged ``|G|^2`` is <= 0)."""
        if not self.count:
            return math.nan
        g = self.grad_sq
        return self.trace / g if g > 0 else math.inf


def noise_scale_two_batch(model: nn.Module, data, b_small: int, b_big: int, *, draws: int = 50,
                          loss="cross_entropy", smoothing: float | None = None, seed: int = 0) -> NoiseScale:
    """``B_simple`` at fixed weights from gradient norms at two batch sizes (McCandlish's estimator).

    Each draw takes a small and a big batch (random examples without replacement, seeded), computes
    their mean-loss gradients with ``loss.backward()`` and feeds the two squared norms to
    ``two_batch_estimate``. The estimates are averaged (``smoothing=None``) or smoothed with an EMA,
    numerator and denominator separately. The model's parameters and ``.grad`` are left as they
    were; the model runs in its current mode.

    Args:
        model: the model at the weights to measure.
        data: a DataBundle (its training split), a pair ``(x, y)`` or a TensorDataset.
        b_small, b_big: the two batch sizes, ``b_small < b_big <= len(data)``.
        draws: number of (small, big) pairs.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable returning a batch mean.
        smoothing: None (plain mean of the draws) or an EMA weight in [0, 1).
        seed: seed of the batches.

    Example:
        >>> _ = torch.manual_seed(0); x = torch.randn(2000, 3); y = x @ torch.ones(3)
        >>> est = noise_scale_two_batch(nn.Linear(3, 1, bias=False), (x, y), 4, 256, loss="mse")
        >>> est.b_simple > 1
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _train_tensors(data)
    two_batch_estimate(0.0, 0.0, b_small, b_big)      # checks the batch sizes
    if b_big > len(x):
        raise ValueError(f"b_big={b_big} is larger than the data ({len(x)} examples); use b_big <= {len(x)}")
    draws = _check_positive_int("draws", draws)
    loss_fn = _loss_fn(loss)
    ema = NoiseScaleEMA(0.0 if smoothing is None else smoothing)
    device = _device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    sums = [0.0, 0.0]

    def sq_norm(idx):
        for p in params:
            p.grad = None
        loss_fn(model(x[idx].to(device)), y[idx].to(device)).backward()
        return float(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))

    try:
        for _ in range(draws):
            small = torch.randperm(len(x), generator=gen)[:b_small]
            big = torch.randperm(len(x), generator=gen)[:b_big]
            g2, tr = two_batch_estimate(sq_norm(small), sq_norm(big), b_small, b_big)
            if smoothing is None:
                sums[0] += g2
                sums[1] += tr
            else:
                ema.update(g2, tr)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if smoothing is None:
        return NoiseScale.of(sums[1] / draws, sums[0] / draws, draws * (b_small + b_big))
    return NoiseScale.of(ema.trace, ema.grad_sq, draws * (b_small + b_big))


class OnlineNoiseScale:
    """The two-batch estimate taken inside training steps (``Trainer(noise_scale_every=N)``).

    Every ``every``-th step the Trainer reads the squared gradient norm after the first micro-batch
    (the small batch) and after the whole batch (the big batch); with ``accumulate=1`` it splits
    that step's batch into two halves to have a small batch at all. The History then carries
    ``noise_grad_sq`` and ``noise_trace`` (that step's unbiased estimates) and ``b_simple`` (their
    EMAs divided), and ``None`` on the other steps.

    Example:
        >>> online = OnlineNoiseScale(every=10, smoothing=0.0)
        >>> online.record(torch.tensor(6.0), torch.tensor(1.3125), 4, 64)["b_simple"]
        20.0
    """

    COLUMNS = ("noise_grad_sq", "noise_trace", "b_simple")
    EMPTY = {"noise_grad_sq": None, "noise_trace": None, "b_simple": None}

    def __init__(self, every: int, smoothing: float = 0.9):
        self.every = _check_positive_int("noise_scale_every", every)
        self.ema = NoiseScaleEMA(smoothing)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def record(self, sq_small: torch.Tensor, sq_big: torch.Tensor, b_small: int, b_big: int) -> dict:
        """Squared norms (tensors, one device sync for both) -> the History's columns."""
        s, b = torch.stack([sq_small.double(), sq_big.double()]).tolist()
        g2, tr = two_batch_estimate(s, b, b_small, b_big)
        return {"noise_grad_sq": g2, "noise_trace": tr, "b_simple": self.ema.update(g2, tr)}

    def rebuild(self, steps) -> None:
        """Recompute the EMA from a History's step table (after loading a checkpoint)."""
        self.ema = NoiseScaleEMA(self.ema.smoothing)
        if "noise_grad_sq" in steps:
            for g2, tr in zip(steps["noise_grad_sq"], steps["noise_trace"]):
                if g2 is not None:
                    self.ema.update(g2, tr)


def squared_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squared gradient entries over ``params`` (a 0-d float32 tensor; no device sync).

    Example:
        >>> p = torch.zeros(2, requires_grad=True); p.grad = torch.tensor([3.0, 4.0])
        >>> squared_grad_norm([p]).item()
        25.0
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return torch.stack([n.float() for n in norms]).square().sum()


def smoothed_noise_scale(history, smoothing: float = 0.9) -> tuple[list[int], list[float]]:
    """Steps and ``b_simple`` re-smoothed from a History's raw ``noise_grad_sq``/``noise_trace``.

    Args:
        history: a History recorded with ``noise_scale_every``.
        smoothing: EMA weight of the past, in [0, 1).

    Example:
        >>> from nbbatch.history import History
        >>> h = History()
        >>> for s, (g, t) in enumerate([(1.0, 10.0), (3.0, 30.0)], 1):
        ...     h.steps.append({"step": s, "noise_grad_sq": g, "noise_trace": t})
        >>> smoothed_noise_scale(h, 0.0)
        ([1, 2], [10.0, 10.0])
    """
    if "noise_grad_sq" not in history.steps:
        raise ValueError("history has no noise-scale columns; train with Trainer(..., noise_scale_every=N)")
    ema = NoiseScaleEMA(smoothing)
    steps, values = [], []
    for s, g2, tr in zip(history.steps["step"], history.steps["noise_grad_sq"], history.steps["noise_trace"]):
        if g2 is not None:
            steps.append(s)
            values.append(ema.update(g2, tr))
    return steps, values
