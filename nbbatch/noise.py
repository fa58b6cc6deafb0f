"""The gradient noise scale's estimator core: the finite-population two-batch estimate and its EMA.

McCandlish et al. (2018): a mean gradient ``g_B`` over ``B`` examples drawn without replacement
from ``N`` has ``E|g_B|^2 = |G|^2 + c_B S^2`` with ``c_B = 1/B - 1/N`` (``sampling_factor``) and
``S^2 = N tr(Sigma)/(N - 1)``; squared norms at two batch sizes give unbiased ``|G|^2`` and
``tr(Sigma)`` (``two_batch_estimate``), averaged numerator and denominator apart
(``NoiseScaleEMA``) before dividing. ``OnlineNoiseScale`` is that estimate taken inside Trainer
steps. This module sits below the Trainer and imports nothing of nbbatch; the measurements that
drive models and data (``gradient_noise_scale``, ``noise_scale_two_batch``, ``sweep``) live in
``nbbatch.diagnostics``, which re-exports these names.

Written by hand because no maintained library offers these estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .checks import check_positive_int, check_smoothing, is_int

__all__ = ["NoiseScale", "sampling_factor", "two_batch_estimate", "NoiseScaleEMA", "OnlineNoiseScale",
           "squared_grad_norm"]


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


def sampling_factor(batch: int, population: int | None = None) -> float:
    """``c_B = 1/B - 1/N``: the variance factor of a mean over ``B`` of ``N`` examples drawn without replacement.

    A batch mean ``g_B`` of per-example gradients drawn without replacement from ``N`` examples has
    ``E|g_B|^2 = |G|^2 + c_B S^2`` with ``S^2 = sum_i |g_i - G|^2 / (N - 1) = N tr(Sigma)/(N - 1)``.
    ``population=None`` (a source of unknown size, or independent draws) gives McCandlish's ``1/B``.

    Example:
        >>> sampling_factor(8), sampling_factor(8, 48), sampling_factor(48, 48)
        (0.125, 0.10416666666666667, 0.0)
    """
    check_positive_int("batch", batch)
    if population is not None and (not is_int(population) or population < batch):
        raise ValueError(f"population must be an int >= batch={batch} or None, got {population!r}")
    return 1.0 / batch - (0.0 if population is None else 1.0 / population)


def two_batch_estimate(sq_small, sq_big, b_small: int, b_big: int, population: int | None = None) -> tuple:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from two squared gradient norms (McCandlish et al.).

    With ``|g_B|^2`` the squared norm of a mean gradient over ``B`` examples drawn without
    replacement from ``N``, ``E|g_B|^2 = |G|^2 + c_B S^2`` with ``c_B = 1/B - 1/N`` and
    ``S^2 = N tr(Sigma)/(N - 1)`` (``sampling_factor``); two batch sizes give two equations:

        |G|^2     ~ (c_small |g_big|^2 - c_big |g_small|^2) / (c_small - c_big)
        tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (c_small - c_big) * (N - 1)/N

    ``population=None`` (data of unknown size) uses McCandlish's ``c_B = 1/B``, exact for
    independent draws and biased for a finite data set: ``B_simple`` comes out about
    ``1/(1 - B_simple/N)`` times too large. Single estimates are noisy and either may be negative;
    average (or ``NoiseScaleEMA``) many of them before dividing. Works elementwise on floats or tensors.

    Args:
        sq_small, sq_big: squared norms of the mean gradients of a small and a big batch.
        b_small, b_big: their batch sizes, ``b_small < b_big``.
        population: ``N``, the number of examples the batches are drawn from (without
            replacement), ``N >= b_big``; None for the ``1/B`` approximation.

    Returns:
        ``(grad_sq, trace)``.

    Example:
        >>> two_batch_estimate(1.0 + 20.0 / 4, 1.0 + 20.0 / 64, 4, 64)   # |G|^2 = 1, tr(Sigma) = 20
        (1.0, 20.0)
        >>> s2 = 20.0 * 100 / 99                                         # the same from N = 100 examples
        >>> [round(v, 9) for v in two_batch_estimate(1 + s2 * (1/4 - 1/100), 1 + s2 * (1/64 - 1/100), 4, 64, 100)]
        [1.0, 20.0]
    """
    for name, value in (("b_small", b_small), ("b_big", b_big)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if b_small == b_big:
        raise ValueError(f"b_small and b_big are equal ({b_small}); the estimator needs two different batch sizes")
    if b_small > b_big:
        raise ValueError(f"b_small={b_small} is larger than b_big={b_big}; pass the smaller batch size first")
    if population is not None and (not is_int(population) or population < b_big):
        raise ValueError(f"population must be an int >= b_big={b_big} (the examples the batches are drawn "
                         f"from) or None, got {population!r}")
    c_small, c_big = sampling_factor(b_small, population), sampling_factor(b_big, population)
    grad_sq = (c_small * sq_big - c_big * sq_small) / (c_small - c_big)
    s2 = (sq_small - sq_big) / (c_small - c_big)        # S^2, the scatter over N - 1
    trace = s2 if population is None else s2 * ((population - 1) / population)
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
        self.smoothing = check_smoothing(smoothing)
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


class OnlineNoiseScale:
    """The two-batch estimate taken inside training steps (``Trainer(noise_scale_every=N)``).

    Every ``every``-th step the Trainer reads the squared gradient norm after the first micro-batch
    (the small batch) and after the whole batch (the big batch); with ``accumulate=1`` it splits
    that step's batch into two halves to have a small batch at all. Data-parallel, the big batch is
    the global batch and the small one this process's first micro-batch. The History then carries
    ``noise_grad_sq`` and ``noise_trace`` (that step's estimates, unbiased for the data set) and
    ``b_simple`` (their EMAs divided), and ``None`` on the other steps.

    Each batch of an epoch is a uniform draw without replacement from the ``population`` training
    examples (and its first micro-batch one from them too), so the estimates use
    ``c_B = 1/B - 1/N`` (``two_batch_estimate``). ``population=None``, for a source of unknown size
    or one that samples with replacement, uses McCandlish's ``1/B`` approximation, which inflates
    ``B_simple`` by about ``1/(1 - B_simple/N)`` when the batches do come from ``N`` examples.

    Args:
        every: measure every this many steps.
        smoothing: EMA weight of the past for ``b_simple``, in [0, 1).
        population: ``N``, the training examples the batches are drawn from; None if unknown.

    Example:
        >>> online = OnlineNoiseScale(every=10, smoothing=0.0)
        >>> online.record(torch.tensor(6.0), torch.tensor(1.3125), 4, 64)["b_simple"]
        20.0
        >>> round(OnlineNoiseScale(10, 0.0, population=4000).record(torch.tensor(6.0), torch.tensor(1.3125), 4, 64)["b_simple"], 2)
        19.9
    """

    COLUMNS = ("noise_grad_sq", "noise_trace", "b_simple")
    EMPTY = {"noise_grad_sq": None, "noise_trace": None, "b_simple": None}

    def __init__(self, every: int, smoothing: float = 0.9, population: int | None = None):
        self.every = check_positive_int("noise_scale_every", every)
        self.ema = NoiseScaleEMA(smoothing)
        if population is not None:
            check_positive_int("population", population)
        self.population = population

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def record(self, sq_small: torch.Tensor, sq_big: torch.Tensor, b_small: int, b_big: int) -> dict:
        """Squared norms (tensors, one device sync for both) -> the History's columns."""
        s, b = torch.stack([sq_small.double(), sq_big.double()]).tolist()
        g2, tr = two_batch_estimate(s, b, b_small, b_big, self.population)
        return {"noise_grad_sq": g2, "noise_trace": tr, "b_simple": self.ema.update(g2, tr)}

    def rebuild(self, table) -> None:
        """Recompute the EMA from a History's step table ``history.steps`` (after loading a checkpoint)."""
        self.ema = NoiseScaleEMA(self.ema.smoothing)
        if "noise_grad_sq" in table:
            for g2, tr in zip(table["noise_grad_sq"], table["noise_trace"]):
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
    # one fused kernel for all the norms where torch has it (the path optimizers use)
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return torch.stack(norms).float().square().sum()
