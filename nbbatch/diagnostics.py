"""Batch-size diagnostics: the gradient noise scale, steps-to-target sweeps and the critical batch,
and a learning-rate range test.

* Gradient noise scale (McCandlish et al. 2018), ``B_simple = tr(Sigma) / |G|^2``:

  - ``gradient_noise_scale``: exact, from per-example gradients (``torch.func`` ``vmap`` over
    ``grad``) over all training examples or a sample of them;
  - ``two_batch_estimate`` / ``NoiseScaleEMA`` / ``noise_scale_two_batch``: McCandlish's
    estimator from squared gradient norms at a small and a big batch, numerator and denominator
    smoothed separately before dividing;
  - ``OnlineNoiseScale``: the same estimator inside ``Trainer`` steps (``noise_scale_every=``),
    from the first micro-batch against the whole batch.

  The estimator core (``sampling_factor``, ``two_batch_estimate``, ``NoiseScaleEMA``,
  ``OnlineNoiseScale``, ``squared_grad_norm``) is defined in ``nbbatch.noise``, below the Trainer
  that uses it, and importable from here as well.

  Batches are drawn without replacement from the ``N`` training examples, so a batch of ``B``
  has ``E|g_B|^2 = |G|^2 + c_B S^2`` with ``c_B = 1/B - 1/N`` and ``S^2 = N tr(Sigma)/(N - 1)``
  (the finite-population correction; McCandlish's ``1/B`` is its ``N -> inf`` limit). All the
  estimators here use that one formula (``sampling_factor``), which makes them unbiased for the
  data set; without it ``B_simple`` comes out about ``1/(1 - B_simple/N)`` times too large.

* ``sweep``: steps and examples to reach a target per batch size, with the best learning rate per
  batch size from a grid or a scaling rule; ``fit_critical_batch`` fits ``S = S_min + E_min/B``
  (McCandlish et al. 2018; Shallue et al. 2019) and gives ``B_crit = E_min / S_min``.

* ``lr_find``: an LR range test (Smith 2017) on a Trainer that leaves its model, optimizer,
  gradients, random state and progress exactly as they were.

Written by hand because no maintained library offers these estimators; per-example gradients
come from ``torch.func`` and the constrained fit from ``scipy.optimize.nnls``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .checks import check_positive_int, check_sizes, check_smoothing, is_int
from .batching import train_tensors
from .config import TrainConfig
from .losses import resolve_loss
# the estimator core lives below the Trainer (nbbatch.noise); its names are importable from here too
from .noise import NoiseScale, NoiseScaleEMA, OnlineNoiseScale, sampling_factor, squared_grad_norm, two_batch_estimate
from .runs import MULTIRUN_OPTIMIZERS, MultiRun
from .schedules import SCALE_RULES, scale_lr
from .trainer import DivergenceError, Target, Trainer

__all__ = [
    "NoiseScale", "gradient_noise_scale", "sampling_factor", "two_batch_estimate", "NoiseScaleEMA", "noise_scale_two_batch",
    "OnlineNoiseScale", "CriticalBatchFit", "fit_critical_batch", "SweepResult", "sweep",
    "LRFinderResult", "lr_find", "smoothed_noise_scale",
]


# ---------------------------------------------------------------------- input checks
def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None


# ---------------------------------------------------------------------- noise scale
def gradient_noise_scale(model: nn.Module, data, *, loss="cross_entropy", sample: int | None = None,
                         chunk_size: int = 256, seed: int = 0) -> NoiseScale:
    """The simple noise scale ``B_simple = tr(Sigma)/|G|^2`` from per-example gradients.

    Per-example gradients ``g_i`` come from ``torch.func`` (``vmap`` over ``grad``), ``chunk_size``
    examples at a time; only their running sum and sum of squares are kept (float64), so memory is
    ``chunk_size x parameters``. With ``sample=None`` every example is used and the values are
    exact for the data set: ``G`` the mean gradient, ``tr(Sigma) = mean |g_i - G|^2``. With
    ``sample=n`` a seeded random subset of ``n`` of the ``N`` examples (drawn without replacement)
    gives unbiased estimates of both, with the finite-population correction: with
    ``s^2 = sum |g_i - mean g|^2 / (n - 1)``, ``tr(Sigma) = s^2 (N - 1)/N`` and
    ``|G|^2 = |mean g|^2 - (1/n - 1/N) s^2`` (``sample=N`` gives the exact values).

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
    x, y = train_tensors(data)
    loss_fn = resolve_loss(loss)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    n_all = len(x)
    if sample is not None:
        check_positive_int("sample", sample)
        if sample < 2 or sample > n_all:
            raise ValueError(f"sample={sample} must lie in [2, {n_all}] (the examples in data)")
    elif n_all < 2:
        raise ValueError("data needs at least 2 examples to measure a gradient covariance")
    if not is_int(seed):
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
    if n == n_all:
        return NoiseScale.of(scatter / n, mean_sq, n)
    # a subset drawn without replacement: E s^2 = S^2 = sum_i |g_i - G|^2 / (N - 1) over the data set,
    # and E|mean|^2 = |G|^2 + c_n S^2 (the same finite-population formula as the two-batch estimator)
    s2 = scatter / (n - 1)
    return NoiseScale.of(s2 * (n_all - 1) / n_all, mean_sq - sampling_factor(n, n_all) * s2, n)


def noise_scale_two_batch(model: nn.Module, data, b_small: int, b_big: int, *, draws: int = 50,
                          loss="cross_entropy", smoothing: float | None = None, seed: int = 0) -> NoiseScale:
    """``B_simple`` at fixed weights from gradient norms at two batch sizes (McCandlish's estimator).

    Each draw takes a small and a big batch (random examples without replacement, seeded), computes
    their mean-loss gradients with ``loss.backward()`` and feeds the two squared norms to
    ``two_batch_estimate`` with ``population=len(data)``, so the averaged ``grad_sq`` and ``trace``
    are unbiased for the data set (the finite-population correction ``c_B = 1/B - 1/N``). The estimates are averaged (``smoothing=None``) or smoothed with an EMA,
    numerator and denominator separately. The model's parameters, buffers and ``.grad`` are left
    as they were; the model runs in its current mode (in training mode batch norm normalises by
    batch statistics; its running statistics are put back afterwards).

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
    x, y = train_tensors(data)
    two_batch_estimate(0.0, 0.0, b_small, b_big)      # checks the batch sizes
    if b_big > len(x):
        raise ValueError(f"b_big={b_big} is larger than the data ({len(x)} examples); use b_big <= {len(x)}")
    draws = check_positive_int("draws", draws)
    loss_fn = resolve_loss(loss)
    ema = NoiseScaleEMA(0.0 if smoothing is None else smoothing)
    device = _device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    # a forward in training mode moves batch-norm running statistics: a measurement must not
    saved_buffers = [b.detach().clone() for b in model.buffers()]
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
            g2, tr = two_batch_estimate(sq_norm(small), sq_norm(big), b_small, b_big, len(x))
            if smoothing is None:
                sums[0] += g2
                sums[1] += tr
            else:
                ema.update(g2, tr)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved_buffers):
                b.copy_(v)
    if smoothing is None:
        return NoiseScale.of(sums[1] / draws, sums[0] / draws, draws * (b_small + b_big))
    return NoiseScale.of(ema.trace, ema.grad_sq, draws * (b_small + b_big))


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


# ---------------------------------------------------------------------- critical batch
@dataclass(frozen=True)
class CriticalBatchFit:
    """``S(B) = s_min + e_min / B`` fitted to steps-to-target (McCandlish et al. 2018).

    Attributes:
        s_min: fewest steps any batch size needs (the large-batch limit).
        e_min: fewest examples any batch size needs (the small-batch limit).
        b_crit: ``e_min / s_min``, where a run costs ``2 s_min`` steps and ``2 e_min`` examples.
        batch_sizes, steps: the points fitted.
    """

    s_min: float
    e_min: float
    batch_sizes: tuple = ()
    steps: tuple = ()

    @property
    def b_crit(self) -> float:
        if self.s_min <= 0:
            return math.inf
        return self.e_min / self.s_min

    def predict_steps(self, batch_size):
        """Steps to the target at ``batch_size`` (a number or an array)."""
        return self.s_min + self.e_min / batch_size

    def predict_examples(self, batch_size):
        """Examples to the target at ``batch_size``: ``B s_min + e_min``."""
        return batch_size * self.s_min + self.e_min

    def regime(self, batch_size: float) -> str:
        """``"perfect scaling"`` below ``b_crit/3`` (the ``e_min/B`` term is over 3x ``s_min``),
        ``"maximal data parallelism"`` above ``3 b_crit``, ``"diminishing returns"`` between."""
        if batch_size < self.b_crit / 3:
            return "perfect scaling"
        if batch_size > 3 * self.b_crit:
            return "maximal data parallelism"
        return "diminishing returns"


def fit_critical_batch(batch_sizes: Sequence[int], steps: Sequence[float]) -> CriticalBatchFit:
    """Fit ``S = S_min + E_min / B`` (both >= 0) to steps-to-target, in relative error.

    Minimises ``sum_i ((S_min + E_min/B_i - S_i) / S_i)^2`` by non-negative least squares
    (``scipy.optimize.nnls``), so each point counts by its relative misfit whatever its size.

    Args:
        batch_sizes: the batch sizes (at least two different ones).
        steps: steps to the target at each batch size (> 0).

    Example:
        >>> fit = fit_critical_batch([16, 64, 256, 1024], [100 + 16000 / b for b in (16, 64, 256, 1024)])
        >>> round(fit.s_min, 3), round(fit.e_min, 1), round(fit.b_crit, 1)
        (100.0, 16000.0, 160.0)
    """
    import numpy as np
    from scipy.optimize import nnls

    b = [float(v) for v in batch_sizes]
    s = [float(v) for v in steps]
    if len(b) != len(s):
        raise ValueError(f"batch_sizes ({len(b)}) and steps ({len(s)}) must have the same length")
    if len(set(b)) < 2:
        raise ValueError(f"batch_sizes must hold at least two different batch sizes to fit S_min and E_min, got {list(batch_sizes)}")
    if any(not math.isfinite(v) or v <= 0 for v in b + s):
        raise ValueError("batch_sizes and steps must be finite numbers > 0")
    B, S = np.asarray(b), np.asarray(s)
    A = np.stack([1.0 / S, 1.0 / (B * S)], axis=1)
    coef, _ = nnls(A, np.ones_like(S))
    # a coefficient at the rounding level of the data is a zero (e.g. perfect scaling: S_min = 0)
    s_min = float(coef[0]) if coef[0] > 1e-9 * S.min() else 0.0
    e_min = float(coef[1]) if coef[1] > 1e-9 * (B * S).min() else 0.0
    return CriticalBatchFit(s_min, e_min, tuple(int(v) if v.is_integer() else v for v in b), tuple(s))


# ---------------------------------------------------------------------- sweeps
def _check_steps(max_steps: int, growth: float) -> list[int]:
    """Steps at which a sweep run evaluates: every step up to 10, then growing by ``growth``."""
    out, s = [], 1
    while s < max_steps:
        out.append(s)
        s = max(s + 1, math.ceil(s * growth)) if s >= 10 else s + 1
    out.append(max_steps)
    return out


@dataclass
class SweepResult:
    """What ``sweep`` measured.

    Attributes:
        target: the ``Target`` (metric, value, mode).
        runs: one dict per (batch size, lr, seed) run: ``batch_size, lr, seed, reached, steps, examples,
            best, final, diverged, curve, budget`` (``curve``: ``[(step, value), ...]`` at the checks).
        best: one dict per batch size, for its best lr (see ``sweep``): ``batch_size, lr, reached,
            steps, examples, best, b_simple`` (the exact noise scale at the weights where the first
            seed's run reached the target), and the spread over seeds: ``seeds`` (how many),
            ``seeds_reached``, ``steps_min``, ``steps_max`` (``steps`` is the mean over the seeds that
            reached the target; with one seed all three are that run's steps).
        fit: ``CriticalBatchFit`` of the mean steps over the batch sizes that reached the target
            (None: fewer than 2).
        max_steps: the step budget of each run (``budget`` in the rows: with ``max_examples``).
        seed_fits: one ``CriticalBatchFit`` per seed (that seed's steps at each batch size's best lr),
            None where that seed has fewer than 2 batch sizes that reached the target.
    """

    target: Any
    runs: list
    best: list
    fit: CriticalBatchFit | None
    max_steps: int
    seed_fits: list = field(default_factory=list)

    @property
    def b_crit(self) -> float | None:
        return None if self.fit is None else self.fit.b_crit

    @property
    def b_crit_range(self) -> tuple[float, float] | None:
        """``(min, max)`` of ``B_crit`` over the per-seed fits (None: fewer than 2 seeds with a fit)."""
        values = [f.b_crit for f in self.seed_fits if f is not None]
        return (min(values), max(values)) if len(values) >= 2 else None

    @property
    def b_simple(self) -> float | None:
        """Median over batch sizes of ``B_simple`` measured where the target was reached."""
        values = sorted(r["b_simple"] for r in self.best if r.get("b_simple") is not None)
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])

    def table(self):
        """The per-batch-size table as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.items() if k != "state"} for r in self.best]).set_index("batch_size")

    def plot(self, figsize=(11, 4)):
        """Steps against batch size and steps against examples, with the fit and its three regimes."""
        import numpy as np
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        ax_b, ax_e = fig.subplots(1, 2)
        hit = [r for r in self.best if r["reached"]]
        miss = [r for r in self.best if not r["reached"]]
        bs = [r["batch_size"] for r in self.best]
        lo, hi = min(bs) / 1.5, max(bs) * 1.5
        spread = any(r.get("seeds", 1) > 1 for r in hit)
        ax_b.loglog([r["batch_size"] for r in hit], [r["steps"] for r in hit], "o", color="C0",
                    label="measured (best lr" + (", mean and min-max over seeds)" if spread else ")"), zorder=3)
        if spread:
            ax_b.errorbar([r["batch_size"] for r in hit], [r["steps"] for r in hit],
                          yerr=[[r["steps"] - r["steps_min"] for r in hit], [r["steps_max"] - r["steps"] for r in hit]],
                          fmt="none", ecolor="C0", capsize=3, zorder=3)
        if miss:
            ax_b.loglog([r["batch_size"] for r in miss], [r["budget"] for r in miss], "x", color="C3",
                        label="not reached within the budget", zorder=3)
        ax_e.loglog([r["examples"] for r in hit], [r["steps"] for r in hit], "o", color="C0", label="measured", zorder=3)
        for r in hit:
            ax_e.annotate(f"B={r['batch_size']}", (r["examples"], r["steps"]), fontsize=7,
                          xytext=(4, 3), textcoords="offset points")
        fit = self.fit
        if fit is not None and fit.s_min > 0 and fit.e_min > 0:
            grid = np.geomspace(lo, hi, 200)
            bc = fit.b_crit
            for (a, b_, color, name) in ((lo, bc / 3, "C2", "perfect scaling"),
                                         (bc / 3, 3 * bc, "C1", "diminishing returns"),
                                         (3 * bc, hi, "C3", "maximal data parallelism")):
                a, b_ = max(a, lo), min(b_, hi)
                if a < b_:
                    ax_b.axvspan(a, b_, color=color, alpha=0.12, lw=0, label=name)
            ax_b.loglog(grid, fit.predict_steps(grid), "-", color="k", lw=1,
                        label=f"fit S = {fit.s_min:.0f} + {fit.e_min:.0f}/B")
            ax_b.axhline(fit.s_min, color="k", ls=":", lw=0.8)
            ax_b.loglog(grid, fit.e_min / grid, "--", color="0.5", lw=0.8, label="E_min/B (perfect scaling)")
            ax_b.axvline(bc, color="k", ls="-.", lw=0.8, label=f"B_crit = {bc:.0f}")
            if self.b_crit_range is not None:
                lo_c, hi_c = self.b_crit_range
                ax_b.axvspan(lo_c, hi_c, color="k", alpha=0.08, lw=0,
                             label=f"B_crit over seeds: {lo_c:.0f}-{hi_c:.0f}")
            ax_b.set_ylim(fit.s_min / 2, None)
            ax_e.loglog(fit.predict_examples(grid), fit.predict_steps(grid), "-", color="k", lw=1,
                        label="(S/S_min - 1)(E/E_min - 1) = 1")
            ax_e.axhline(fit.s_min, color="k", ls=":", lw=0.8, label="S_min")
            ax_e.axvline(fit.e_min, color="0.5", ls=":", lw=0.8, label="E_min")
            ax_e.loglog([2 * fit.e_min], [2 * fit.s_min], "*", color="k", ms=10, label="B_crit: (2 E_min, 2 S_min)")
        t = self.target
        title = f"{t.metric} {'<=' if t.mode == 'min' else '>='} {t.value:g}"
        ax_b.set(xlabel="batch size B", ylabel="steps to target", title=f"steps to {title}")
        ax_e.set(xlabel="examples to target (B x steps)", ylabel="steps to target", title="steps against examples")
        for ax in (ax_b, ax_e):
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        return fig


def _parse_target(target):

    if isinstance(target, bool) or target is None:
        raise ValueError(f"target={target!r}: give a loss value, ('metric', value) or 'metric<=value'")
    if isinstance(target, (int, float)):
        target = ("loss", float(target))
    return Target.parse(target)


def _check_lrs(name, values) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not values:
        raise ValueError(f"{name} is empty: give at least one learning rate")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must hold finite numbers > 0, got {v!r}")
    return [float(v) for v in values]


def sweep(model_fn: Callable[[], nn.Module], data, batch_sizes: Sequence[int], *, target,
          lrs: Sequence[float] | None = None, lr: float | None = None, scale_rule: str = "linear",
          base_batch_size: int | None = None, lr_factors: Sequence[float] = (1.0,), max_steps: int = 1000,
          max_examples: int | None = None, eval_data=None, check_growth: float = 1.05, noise_scale: bool = True, seed: int = 0,
          seeds: Sequence[int] | None = None, multirun: bool | str = "auto",
          progress: Callable[[dict], Any] | None = None, **train_options) -> SweepResult:
    """Steps (and examples) to reach a target at each batch size, with the best learning rate for each.

    Every run starts from the same weights (``torch.manual_seed(seed)`` then ``model_fn()``) and
    trains a ``Trainer`` for at most ``max_steps`` steps. The target is checked on ``eval_data``
    (default: the whole training set) at every step up to 10 and then at steps growing by
    ``check_growth`` (5%), so steps-to-target are resolved to about that fraction. A run that does
    not reach the target is reported as not reached with the best value it saw (not an error); a
    run that diverges is reported as diverged. Per batch size the best learning rate is the one
    that reached the target in the fewest steps. ``S = S_min + E_min/B`` is then fitted to the
    batch sizes that reached it (``fit_critical_batch``), and with ``noise_scale=True`` the exact
    ``B_simple`` (``gradient_noise_scale``, at most 4096 training examples) is measured at the
    weights where each best run reached the target.

    Seeds: with ``seeds=[0, 1, 2]`` every (batch size, lr) is trained once per seed (initial weights
    ``torch.manual_seed(s); model_fn()`` and data order). The best lr of a batch size is then the one
    whose seeds all reached the target in the fewest steps on average (else the one most seeds
    reached); its row carries the mean steps and their min-max over seeds, the figure shows them as
    error bars, and ``B_crit`` is fitted to the mean steps and once per seed (``b_crit_range``).

    Each batch size's runs (every lr and seed) train together as one ``nbbatch.runs.MultiRun``
    (``multirun="auto"``, where the options allow it: an optimizer of ``MULTIRUN_OPTIMIZERS``, no
    accumulation, clipping or gradient noise); ``multirun=False`` trains them one after another with
    ``Trainer`` (the same runs, to float rounding), ``True`` insists on MultiRun.

    Learning rates: ``lrs`` is a grid tried at every batch size; or ``lr`` is scaled to each batch
    size with ``scale_rule`` ("linear", "sqrt" or "none"; ``nbbatch.schedules.scale_lr``) from
    ``base_batch_size`` (default the smallest batch size) and multiplied by each of ``lr_factors``.

    Args:
        model_fn: builds a fresh model (called with no arguments).
        data: a DataBundle or a pair ``(x, y)`` of training tensors.
        batch_sizes: the batch sizes (positive, at most the training set's size).
        target: a loss value, ``("accuracy", 0.8)``, ``{"loss": 0.5}`` or ``"loss<=0.5"``: a key of
            ``Trainer.evaluate`` (metrics ending in "loss" are minimised, others maximised).
        lrs / lr, scale_rule, base_batch_size, lr_factors: the learning rates (see above).
        max_steps: step budget of each run.
        max_examples: example budget of each run (None: none): a run at batch size ``B`` stops
            after ``min(max_steps, ceil(max_examples / B))`` steps.
        eval_data: where the target is measured: None (training set), ``"test"`` (a DataBundle's
            test split) or ``(x, y)``.
        check_growth: growth factor (> 1) of the interval between target checks after step 10.
        noise_scale: measure ``B_simple`` at the target (see above).
        seed: seed of the initial weights and of the data order.
        seeds: several seeds (replaces ``seed``): each run is repeated once per seed.
        multirun: ``"auto"``, True or False (see above).
        progress: called with each run's result dict as it finishes (for printing).
        **train_options: other ``Trainer`` options (optimizer, momentum, warmup, loss, ...).

    Example:
        >>> from nbbatch import data, models
        >>> d = data.mnist1d(num_samples=1000)
        >>> res = sweep(lambda: models.MLP(), d, [32, 128], target=1.5, lrs=[0.1, 0.2],
        ...             optimizer="momentum", max_steps=300)          # doctest: +SKIP
        >>> [(r["batch_size"], r["reached"]) for r in res.best]      # doctest: +SKIP
        [(32, True), (128, True)]
    """

    # ---- validate everything first ------------------------------------------------------------
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a callable returning a fresh model, got {type(model_fn).__name__}")
    x, y = train_tensors(data)
    batch_sizes = check_sizes("batch_sizes", batch_sizes)
    for b in batch_sizes:
        if b > len(x):
            raise ValueError(f"batch_sizes: {b} is larger than the training set ({len(x)} examples)")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(f"batch_sizes holds duplicates: {batch_sizes}")
    batch_sizes = sorted(batch_sizes)
    target = _parse_target(target)
    if (lrs is None) == (lr is None):
        raise ValueError("give lrs=[...] (a grid tried at every batch size) or lr=... with scale_rule, not both")
    if lrs is not None:
        grid = _check_lrs("lrs", lrs)
        lr_table = {b: grid for b in batch_sizes}
    else:
        _check_lrs("lr", [lr])
        factors = _check_lrs("lr_factors", lr_factors)
        if scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule={scale_rule!r} is not known; use one of {SCALE_RULES}")
        base = batch_sizes[0] if base_batch_size is None else check_positive_int("base_batch_size", base_batch_size)
        lr_table = {b: [scale_lr(float(lr), b, base, scale_rule) * f for f in factors] for b in batch_sizes}
    max_steps = check_positive_int("max_steps", max_steps)
    if max_examples is not None:
        check_positive_int("max_examples", max_examples)
    budget = {b: max_steps if max_examples is None else min(max_steps, -(-max_examples // b)) for b in batch_sizes}
    if isinstance(check_growth, bool) or not isinstance(check_growth, (int, float)) or not check_growth > 1.0:
        raise ValueError(f"check_growth must be a number > 1, got {check_growth!r}")
    for name in ("batch_size", "lr", "scale_rule", "base_batch_size", "eval_every"):
        if name in train_options:
            raise ValueError(f"{name}= is set by the sweep itself; remove it from the options")
    if seeds is None:
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        seed_list = [seed]
    else:
        if seed != 0:
            raise ValueError("give seed=... or seeds=[...], not both")
        try:
            seed_list = list(seeds)
        except TypeError:
            raise TypeError(f"seeds must be a sequence of ints, got {seeds!r}") from None
        if not seed_list or not all(is_int(v) for v in seed_list):
            raise ValueError(f"seeds must hold at least one int, got {seeds!r}")
        if len(set(seed_list)) != len(seed_list):
            raise ValueError(f"seeds holds duplicates: {seed_list}")
    if multirun not in ("auto", True, False):
        raise ValueError(f"multirun must be 'auto', True or False, got {multirun!r}")
    vectorise = multirun is True or (multirun == "auto" and _multirun_fits(train_options))
    if multirun is True and not _multirun_fits(train_options):
        raise ValueError("multirun=True: these options need Trainer (an optimizer outside "
                         "nbbatch.runs.MULTIRUN_OPTIMIZERS, or accumulation, clipping, gradient noise, "
                         "noise_scale_every, checkpoint_segments, fp16); use multirun='auto' or False")
    if eval_data is None:
        eval_xy = (x, y)
    elif isinstance(eval_data, str):
        if eval_data != "test" or getattr(data, "x_test", None) is None:
            raise ValueError(f"eval_data={eval_data!r}: use None (training set), 'test' with a DataBundle, or (x, y)")
        eval_xy = (data.x_test, data.y_test)
    else:
        eval_xy = train_tensors(eval_data, "eval_data")
    checks = {b: set(_check_steps(budget[b], float(check_growth))) for b in batch_sizes}

    runs = []
    better = min if target.mode == "min" else max
    losses = []   # the runs' loss (from the options or a config=), for the noise scale

    def new_run(b, lr_value, s, start):
        if target.metric not in start:
            raise ValueError(f"target metric {target.metric!r} is not measured; known: {sorted(start)}")
        return {"batch_size": b, "lr": lr_value, "seed": s, "budget": budget[b], "reached": False, "steps": None,
                "examples": None, "best": start[target.metric], "final": start[target.metric], "diverged": False,
                "curve": [(0, start[target.metric])], "state": None}

    def record(run, step, examples, value, model_state):
        """A check: returns True when the run has just reached the target."""
        run["curve"].append((step, value))
        run["final"] = value
        run["best"] = better(run["best"], value) if math.isfinite(value) else run["best"]
        if target.reached(value):
            run.update(reached=True, steps=step, examples=examples)
            if noise_scale:
                run["state"] = model_state()
            return True
        return False

    def report(run):
        runs.append(run)
        if progress is not None:
            progress({k: v for k, v in run.items() if k not in ("curve", "state")})

    for b in batch_sizes:
        if vectorise:

            pairs = [(lr_value, s) for lr_value in lr_table[b] for s in seed_list]
            mr = MultiRun(model_fn, (x, y), batch_size=b, lr=[p[0] for p in pairs], seed=[p[1] for p in pairs],
                          **train_options)
            losses.append(mr.config.loss)
            mine = [new_run(b, lr_value, s, start) for (lr_value, s), start in zip(pairs, mr.evaluate(eval_xy))]
            done = [r for r, run in enumerate(mine) if target.reached(run["best"])]
            for r in done:
                mine[r].update(reached=True, steps=0, examples=0)
            if done:
                mr.stop_runs(done, "target")

            def check(m, rows, mine=mine, checks=checks[b]):
                if m.step_count not in checks:
                    return
                values = m.evaluate(eval_xy, runs=[r for r, row in enumerate(rows) if row is not None])
                hit = [r for r, row in enumerate(rows) if row is not None and record(
                    mine[r], m.step_count, m.examples_seen[r], values[r][target.metric],
                    lambda r=r: {k: v.detach().clone() for k, v in m.model(r).state_dict().items()})]
                if hit:
                    m.stop_runs(hit, "target")

            if len(done) < len(mine):
                mr.fit(steps=budget[b], on_step=check)
            for r, run in enumerate(mine):
                run["diverged"] = mr.status[r] == "diverged"
                report(run)
            continue
        for lr_value in lr_table[b]:
            for s in seed_list:
                torch.manual_seed(s)
                model = model_fn()
                if not isinstance(model, nn.Module):
                    raise TypeError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
                trainer = Trainer(model, (x, y), batch_size=b, lr=lr_value, seed=s, **train_options)
                losses.append(trainer.config.loss)
                run = new_run(b, lr_value, s, trainer.evaluate(eval_xy))

                def check(t, row, run=run, checks=checks[b]):
                    if t.step_count in checks and record(
                            run, t.step_count, t.examples_seen, t.evaluate(eval_xy)[target.metric],
                            lambda: {k: v.detach().clone() for k, v in t.model.state_dict().items()}):
                        t.request_stop()

                trainer.add_callback("step_end", check)
                if target.reached(run["best"]):
                    run.update(reached=True, steps=0, examples=0)
                else:
                    try:
                        trainer.fit(steps=budget[b])
                    except DivergenceError:
                        run["diverged"] = True
                report(run)
    loss = losses[-1]

    best = []
    for b in batch_sizes:
        mine = [r for r in runs if r["batch_size"] == b]
        by_lr = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)

        def rank(lr_value):
            group = by_lr[lr_value]
            hits = [r["steps"] for r in group if r["reached"]]
            return (-len(hits), sum(hits) / len(hits) if hits else 0.0)

        if any(r["reached"] for r in mine):
            pick_lr = min(by_lr, key=rank)
        else:
            def mean_best(lr_value):
                vals = [r["best"] for r in by_lr[lr_value] if math.isfinite(r["best"])]
                return sum(vals) / len(vals) if vals else math.nan

            finite = [v for v in by_lr if math.isfinite(mean_best(v))] or list(by_lr)
            pick_lr = better(finite, key=mean_best)
        group = by_lr[pick_lr]
        hits = [r for r in group if r["reached"]]
        steps = [r["steps"] for r in hits]
        finite_best = [r["best"] for r in group if math.isfinite(r["best"])]
        first = group[0]
        row = {"batch_size": b, "lr": pick_lr, "budget": budget[b], "reached": len(hits) == len(group),
               "steps": (sum(steps) / len(steps) if len(group) > 1 else steps[0]) if hits else None,
               "examples": (sum(r["examples"] for r in hits) / len(hits) if len(group) > 1 else hits[0]["examples"])
               if hits else None,
               "best": (better(finite_best) if len(group) == 1 else sum(finite_best) / len(finite_best))
               if finite_best else first["best"],
               "diverged_lrs": sum(any(r["diverged"] for r in g) for g in by_lr.values()),
               "b_simple": None, "seeds": len(group), "seeds_reached": len(hits),
               "steps_min": min(steps) if hits else None, "steps_max": max(steps) if hits else None}
        measured = next((r for r in group if r["state"] is not None), None)
        if noise_scale and measured is not None:
            torch.manual_seed(measured["seed"])
            model = model_fn()
            model.load_state_dict(measured["state"])
            ns = gradient_noise_scale(model, (x, y), loss=loss,
                                      sample=None if len(x) <= 4096 else 4096, seed=measured["seed"])
            row["b_simple"] = ns.b_simple
        row["_by_seed"] = {r["seed"]: r["steps"] for r in hits}
        best.append(row)
    seed_fits = []
    if len(seed_list) > 1:
        for s in seed_list:
            pts = [(r["batch_size"], r["_by_seed"][s]) for r in best if r["_by_seed"].get(s)]
            seed_fits.append(fit_critical_batch(*zip(*pts)) if len({p[0] for p in pts}) >= 2 else None)
    for r in best:
        r.pop("_by_seed")
    for r in runs:
        r.pop("state", None)
    points = [(r["batch_size"], r["steps"]) for r in best if r["reached"] and r["steps"] > 0]
    fit = fit_critical_batch(*zip(*points)) if len({p[0] for p in points}) >= 2 else None
    return SweepResult(target=target, runs=runs, best=best, fit=fit, max_steps=max_steps, seed_fits=seed_fits)


def _multirun_fits(options: Mapping[str, Any]) -> bool:
    """Whether a sweep's ``Trainer`` options can train as one ``nbbatch.runs.MultiRun``."""

    config = options.get("config")
    try:
        cfg = (config if isinstance(config, TrainConfig) else TrainConfig()).replace(
            **{k: v for k, v in options.items() if k != "config"})
    except (TypeError, ValueError):
        return False   # the Trainer path reports the bad option with its own message
    return (isinstance(cfg.optimizer, str) and cfg.optimizer in MULTIRUN_OPTIMIZERS and cfg.accumulate == 1
            and cfg.clip_grad_norm is None and cfg.grad_noise == 0 and cfg.noise_scale_every is None
            and cfg.checkpoint_segments == 0 and cfg.precision != "fp16")


# ---------------------------------------------------------------------- learning-rate range test
@dataclass
class LRFinderResult:
    """An LR range test: the learning rates tried, the losses, and a suggestion.

    Attributes:
        lrs, losses: each step's learning rate and training loss (of the batch, before the step).
        smoothed: bias-corrected EMA of ``losses``.
        suggested_lr: a tenth of the learning rate at the lowest smoothed loss (Smith 2017's rule
            of thumb: well below where the loss turns up).
        stopped_early: the loss blew up (non-finite or ``diverge`` x its best) before the end.
    """

    lrs: list
    losses: list
    smoothed: list
    suggested_lr: float
    stopped_early: bool

    def __repr__(self) -> str:   # the per-step lists are long: show their span, not every value
        return (f"LRFinderResult(steps={len(self.lrs)}, lrs={self.lrs[0]:.3g}..{self.lrs[-1]:.3g}, "
                f"suggested_lr={self.suggested_lr:.3g}, stopped_early={self.stopped_early})")

    def plot(self, figsize=(5, 3.5)):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.subplots()
        ax.semilogx(self.lrs, self.losses, lw=0.8, alpha=0.4, label="loss")
        ax.semilogx(self.lrs, self.smoothed, lw=1.5, label="smoothed")
        ax.axvline(self.suggested_lr, color="k", ls=":", label=f"suggested {self.suggested_lr:.3g}")
        ax.set(xlabel="learning rate", ylabel="training loss", title="LR range test")
        ax.legend(fontsize=8)
        return fig


def lr_find(trainer, *, start_lr: float = 1e-4, end_lr: float = 10.0, steps: int = 100,
            smoothing: float = 0.9, diverge: float = 4.0) -> LRFinderResult:
    """LR range test: train with the learning rate growing geometrically, then undo everything.

    Runs up to ``steps`` of the trainer's own optimizer steps (its batches in the order the run
    would see them, its micro-batches, loss scaling, clipping, gradient noise, checkpointing and
    data parallelism; no callbacks) with the learning rate
    going from ``start_lr`` to ``end_lr``, and stops when the loss turns non-finite or its smoothed
    value exceeds ``diverge`` times the best. Then the model's parameters and buffers, its mode,
    the parameters' ``.grad``, the optimizer's state and hyperparameters and the random number
    generators are restored exactly (bitwise); the trainer's progress and History are not touched.

    Args:
        trainer: an ``nbbatch.Trainer``.
        start_lr, end_lr: the range, ``0 < start_lr < end_lr``.
        steps: number of steps (at least 2).
        smoothing: EMA weight of the past for the smoothed loss, in [0, 1).
        diverge: stop when the smoothed loss exceeds this multiple (> 1) of its best.

    Example:
        >>> from nbbatch import Trainer, data, models
        >>> t = Trainer(models.MLP(), data.mnist1d(num_samples=1000), batch_size=64, optimizer="momentum")
        >>> res = lr_find(t, steps=50)                                # doctest: +SKIP
        >>> 1e-4 < res.suggested_lr < 10                              # doctest: +SKIP
        True
    """

    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be an nbbatch Trainer, got {type(trainer).__name__}")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if end_lr <= start_lr:
        raise ValueError(f"end_lr={end_lr} must be larger than start_lr={start_lr}")
    if not is_int(steps) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    smoothing = check_smoothing(smoothing)
    if isinstance(diverge, bool) or not isinstance(diverge, (int, float)) or not diverge > 1:
        raise ValueError(f"diverge must be a number > 1, got {diverge!r}")

    # One training call at a time: a fit running (in a thread, or the caller of this callback)
    # refuses the range test instead of interleaving their steps.
    with trainer.exclusive("lr_find"):
        result = _range_test(trainer, start_lr, end_lr, steps, smoothing, diverge)
    if result.stopped_early and len(result.lrs) <= 2:
        warnings.warn(f"lr_find: the loss ran away within {len(result.lrs)} step(s) of start_lr={start_lr:g}, "
                      f"so the range holds no usable learning rate and suggested_lr={result.suggested_lr:g} "
                      f"means nothing; lower start_lr (the default is 1e-4)", stacklevel=2)
    return result


def _range_test(trainer, start_lr, end_lr, steps, smoothing, diverge) -> LRFinderResult:
    # The trainer's own step does the work (its micro-batches, loss scaling, clipping, gradient
    # noise, checkpointing, data parallelism), with the learning rate taken from the range instead
    # of the schedule and no callbacks (the range test is not the run); its full state (model,
    # optimizer, progress, History, RNG, data position) is put back after.
    first = trainer.step_count
    ratio = (end_lr / start_lr) ** (1.0 / (steps - 1))
    lrs, losses, smoothed = [], [], []
    avg, best, stopped = 0.0, math.inf, False
    saved = trainer.snapshot()
    trainer.model.train()
    try:
        with trainer.override_lr(lambda step: start_lr * ratio ** (step - first)):
            for i in range(steps):
                try:
                    row = trainer.step(callbacks=False)
                except DivergenceError:   # a non-finite loss or gradient: no update was made
                    stopped = True
                    break
                lrs.append(row["lr"])
                losses.append(row["loss"])
                avg = smoothing * avg + (1 - smoothing) * row["loss"]
                smooth = avg / (1 - smoothing ** (i + 1))
                smoothed.append(smooth)
                best = min(best, smooth)
                if smooth > diverge * best:
                    stopped = True
                    break
    finally:
        trainer.restore(saved)
    if not lrs:
        raise ValueError(f"lr_find: the loss was not finite even at start_lr={start_lr}")
    i_min = min(range(len(smoothed)), key=smoothed.__getitem__)
    return LRFinderResult(lrs, losses, smoothed, lrs[i_min] / 10, stopped)
