"""How to choose the batch size: one call that follows the Deep Learning Tuning Playbook's procedure.

:func:`choose_batch_size` gathers three pieces of evidence on the user's own model, data and
hardware, and recommends the largest batch size that all three allow:

1. **memory**: the largest batch whose training step fits a byte budget
   (``nbbatch.memory.find_max_batch_size``);
2. **throughput**: examples per second against batch size on this device
   (``nbbatch.memory.measure``) and the knee where doubling the batch stops buying enough speed
   (``nbbatch.memory.find_knee`` / ``fit_step_time``): beyond it a bigger batch does not train faster;
3. **gradient noise**: the simple noise scale ``B_simple = tr(Sigma)/|G|^2``
   (``nbbatch.diagnostics.gradient_noise_scale``) after a short warm-up training, the estimate of the
   critical batch ``B_crit`` (McCandlish et al. 2018): well below it doubling the batch halves the
   steps (perfect scaling), well above it a bigger batch only spends more examples per step.

The recommendation is the largest candidate batch size at most ``min(memory ceiling, throughput knee,
noise_factor x B_simple, data set size)``, with the reason for each bound recorded, and the learning
rate to start re-tuning from (the scaling rule applied to the lr known at ``base_batch_size``). The
validation accuracy plays no part: with the learning rate, warm-up and schedule re-tuned, every batch
size reaches the same result (Shallue et al. 2019); the batch size decides how fast, not how well.

Each piece of evidence may be given instead of measured (``max_batch_size=``, ``throughput=``,
``noise_scale=``), for measurements made elsewhere or on another machine. Written by hand: no maintained
library strings these measurements together; each measurement is nbbatch's own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from . import diagnostics, memory
from .batching import train_tensors
from .checks import check_sizes, is_int
from .config import TrainConfig
from .device import describe_device, resolve_device
from .noise import NoiseScale
from .schedules import SCALE_RULES, scale_lr
from .trainer import Trainer

__all__ = ["BatchSizeChoice", "choose_batch_size", "default_candidates"]

KNEE_METHODS = ("doubling", "fit")
# options the recipe sets itself: giving them as training options would be ambiguous
_OWN_OPTIONS = ("batch_size", "lr", "optimizer", "seed", "base_batch_size", "scale_rule")


# ---------------------------------------------------------------------- the result
@dataclass
class BatchSizeChoice:
    """A recommended batch size and the evidence behind it (from :func:`choose_batch_size`).

    Attributes:
        batch_size: the recommendation: the largest candidate at most ``limit`` (``floor(limit)``
            when no candidate is that small).
        limit: ``min`` of the bounds below (examples).
        limited_by: which bound set ``limit``: ``"memory"``, ``"throughput"``, ``"noise scale"`` or
            ``"data set"``.
        bounds: each bound in examples: ``{"memory": ..., "throughput": ..., "noise scale": ...,
            "data set": N}``. ``"memory"`` is absent without a budget, ``"throughput"`` with fewer than
            two points or when throughput still scales at the largest candidate within the others.
        max_batch_size: the memory ceiling (None: no budget, memory not limiting).
        budget: the byte budget the ceiling was found for (None: none).
        throughput: ``{batch_size: examples per second}`` measured (or given), increasing batch sizes.
        knee: the throughput knee (a batch size of ``throughput``; None: fewer than two points).
        min_gain, knee_method: how the knee was found (:func:`nbbatch.memory.find_knee` or
            :func:`nbbatch.memory.fit_step_time`).
        b_simple: the gradient noise scale after the warm-up (the estimate of ``B_crit``).
        noise_factor: the noise bound is ``noise_factor * b_simple``.
        warmup_steps, warmup_loss: the warm-up training before the noise scale (its steps at
            ``base_batch_size`` and the mean batch loss of its last 10 steps; None when the noise
            scale was given, or with no warm-up steps).
        dataset_size: training examples ``N``.
        candidates: the batch sizes considered.
        lr, base_batch_size, scale_rule: the learning rate known to work at ``base_batch_size``
            and the rule that scales it.
        suggested_lr: ``scale_lr(lr, batch_size, base_batch_size, scale_rule)``: where to start
            re-tuning (confirm with ``nbbatch.diagnostics.lr_find``).
        lr_find: the :class:`nbbatch.diagnostics.LRFinderResult` at the recommended batch size
            (None unless ``lr_find_steps`` was given).
        sources: for each piece of evidence, ``"measured"``, ``"given"`` or ``"none"``.
        reasons: the reasoning, one sentence per step.
        device: the device measured on.
        seconds: wall time of the whole recipe.
    """

    batch_size: int
    limit: float
    limited_by: str
    bounds: dict
    max_batch_size: int | None
    budget: int | None
    throughput: dict
    knee: int | None
    min_gain: float
    knee_method: str
    b_simple: float | None
    noise_factor: float
    warmup_steps: int | None
    warmup_loss: float | None
    dataset_size: int
    candidates: list
    lr: float
    base_batch_size: int
    scale_rule: str
    suggested_lr: float
    lr_find: Any = None
    sources: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    device: str = ""
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        """One dict per candidate: ``batch_size``, ``examples_per_s`` (None: not measured), whether it
        ``fits_memory``, is ``within_knee``, ``within_noise`` (at most ``noise_factor * b_simple``),
        ``within_data``, and whether it is the ``chosen`` one."""
        out = []
        for b in sorted(set(self.candidates) | {self.batch_size}):
            mem = self.bounds.get("memory")
            thr = self.bounds.get("throughput")
            noise = self.bounds.get("noise scale")
            out.append({"batch_size": b, "examples_per_s": self.throughput.get(b),
                        "fits_memory": None if mem is None else b <= mem,
                        "within_knee": None if thr is None else b <= thr,
                        "within_noise": None if noise is None else b <= noise,
                        "within_data": b <= self.dataset_size,
                        "chosen": b == self.batch_size})
        return out

    def table(self):
        """:meth:`rows` as a pandas DataFrame indexed by batch size (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows()).set_index("batch_size")

    def summary(self) -> str:
        """The recommendation, the bounds and the reasoning as text."""
        lines = [f"batch size {self.batch_size} (limited by {self.limited_by}); "
                 f"start re-tuning at lr {self.suggested_lr:.4g} ({self.scale_rule} rule from lr {self.lr:g} "
                 f"at B={self.base_batch_size})"]
        for name, value in self.bounds.items():
            lines.append(f"  {name:<12} bound {value:>10.1f}   ({self.sources.get(name, 'fixed')})")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)

    def __repr__(self) -> str:
        b_simple = "None" if self.b_simple is None else f"{self.b_simple:.1f}"
        return (f"BatchSizeChoice(batch_size={self.batch_size}, limited_by={self.limited_by!r}, "
                f"max_batch_size={self.max_batch_size}, knee={self.knee}, b_simple={b_simple}, "
                f"dataset_size={self.dataset_size}, suggested_lr={self.suggested_lr:.4g})")

    def _repr_html_(self) -> str:
        import html

        items = "".join(f"<li>{html.escape(r)}</li>" for r in self.reasons)
        head = html.escape(self.summary().splitlines()[0])
        rows = "".join(
            "<tr>" + "".join(f"<td>{'' if v is None else (f'{v:.0f}' if isinstance(v, float) else html.escape(str(v)))}</td>"
                             for v in r.values()) + "</tr>" for r in self.rows())
        cols = "".join(f"<th>{html.escape(k)}</th>" for k in self.rows()[0])
        return (f"<div><b>{head}</b><ul>{items}</ul>"
                f"<table><thead><tr>{cols}</tr></thead><tbody>{rows}</tbody></table></div>")

    def figure(self, figsize=(7, 3.8)):
        """Throughput against batch size with every bound and the recommendation marked
        (a ``matplotlib.figure.Figure``, no pyplot)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.subplots()
        if self.throughput:
            bs = sorted(self.throughput)
            ax.plot(bs, [self.throughput[b] for b in bs], "o-", color="C0", label="throughput")
            ax.set_ylabel("examples / s")
        else:
            ax.set_yticks([])
        styles = {"memory": ("C3", "-"), "throughput": ("C0", "--"), "noise scale": ("C2", "-."), "data set": ("0.4", ":")}
        for name, value in self.bounds.items():
            if math.isfinite(value):
                color, ls = styles.get(name, ("k", ":"))
                ax.axvline(value, color=color, ls=ls, lw=1, label=f"{name} bound {value:.0f}")
        ax.axvline(self.batch_size, color="k", lw=2.5, alpha=0.35, label=f"recommended B={self.batch_size}")
        ax.set(xscale="log", xlabel="batch size", title=f"choosing the batch size ({self.device})")
        if self.throughput:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        return fig


# ---------------------------------------------------------------------- checks
def default_candidates(dataset_size: int, smallest: int = 8) -> list[int]:
    """Powers of two from ``smallest`` up to ``dataset_size`` (``[dataset_size]`` when it is smaller).

    Example:
        >>> default_candidates(1000)
        [8, 16, 32, 64, 128, 256, 512]
    """
    if not is_int(dataset_size) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    out, b = [], smallest
    while b <= dataset_size:
        out.append(b)
        b *= 2
    return out or [dataset_size]


def _check_number(name: str, value, *, low: float = 0.0, allow_none: bool = False, strict: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def _check_candidates(candidates, n: int) -> list[int]:
    if candidates is None:
        return default_candidates(n)
    values = check_sizes("candidates", candidates)
    if values != sorted(set(values)):
        raise ValueError(f"candidates must be increasing and distinct, got {values!r}")
    if values[0] > n:
        raise ValueError(f"candidates: the smallest batch size {values[0]} exceeds the data set "
                         f"({n} examples); give batch sizes <= {n}")
    return [v for v in values if v <= n]


def _check_throughput(throughput) -> dict:
    if isinstance(throughput, memory.MemoryReport):
        pairs = [(r["batch_size"], r.get("examples_per_s")) for r in throughput.rows if not r.get("oom")]
        if any(v is None for _, v in pairs):
            raise ValueError("throughput: this MemoryReport was measured with steps=0 and holds no examples/s; "
                             "measure with steps >= 1")
    elif isinstance(throughput, Mapping):
        pairs = list(throughput.items())
    else:
        raise TypeError(f"throughput must be a mapping {{batch_size: examples per second}} or a MemoryReport, "
                        f"got {type(throughput).__name__}")
    if not pairs:
        raise ValueError("throughput is empty: give at least one {batch_size: examples per second}")
    for b, v in pairs:
        if not is_int(b) or b < 1:
            raise ValueError(f"throughput: batch sizes must be positive ints, got {b!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"throughput: examples per second must be finite numbers > 0, got {v!r} at B={b}")
    return dict(sorted((int(b), float(v)) for b, v in pairs))


def _knee(throughput: dict, min_gain: float, method: str) -> tuple[int | None, bool]:
    """The knee (a measured batch size; None with fewer than two points) and whether throughput
    saturates within the measured range (False: it still scales at the largest batch measured)."""
    bs = sorted(throughput)
    if len(bs) < 2:
        return None, False
    if method == "doubling":
        knee = memory.find_knee(bs, [throughput[b] for b in bs], min_gain=min_gain)
        return knee, knee < bs[-1]
    fitted = memory.fit_step_time(bs, [b / throughput[b] for b in bs], min_gain)["knee"]
    below = [b for b in bs if b <= fitted]
    return (max(below) if below else bs[0]), fitted < bs[-1]


def _measure_rounds(model, x, y, sizes, options, timed_steps, rounds, time_budget_s, reasons) -> dict:
    """Examples/s at each batch size: the best of ``rounds`` rounds over all sizes (round-robin).

    On a shared machine a burst of other work slows whatever is timed during it: measured in rounds,
    a burst spoils one round's point, and the best round (the least disturbed) is kept.
    """
    eps: dict[int, float] = {}
    t0 = time.perf_counter()
    for r in range(rounds):
        for b in sizes:
            if time_budget_s is not None and eps and time.perf_counter() - t0 > time_budget_s:
                reasons.append(f"throughput: the time budget of {time_budget_s:g} s ended the measurement "
                               f"in round {r + 1} of {rounds}, before B={b}.")
                return eps
            row = memory.measure(model, (x, y), [b], steps=timed_steps, **options).rows[0]
            if row.get("oom"):
                reasons.append(f"throughput: B={b} ran out of memory; larger batches were not measured.")
                sizes = [s for s in sizes if s < b]
                break
            eps[b] = max(eps.get(b, 0.0), row["examples_per_s"])
    return eps


# ---------------------------------------------------------------------- the recipe
def choose_batch_size(model_fn: Callable[[], nn.Module], data, *, budget: int | None = None,
                      candidates: Sequence[int] | None = None, lr: float = 0.05, optimizer: str = "momentum",
                      base_batch_size: int = 32, scale_rule: str = "linear", warmup_steps: int = 100,
                      noise_factor: float = 1.0, noise_sample: int | None = 4096, min_gain: float = 1.25,
                      knee_method: str = "doubling", timed_steps: int = 10, rounds: int = 3,
                      time_budget_s: float | None = None,
                      max_batch_size: int | None = None, throughput=None, noise_scale=None,
                      lr_find_steps: int = 0, seed: int = 0, **train_options) -> BatchSizeChoice:
    """Recommend a batch size from memory, throughput and gradient noise (the Tuning Playbook's recipe).

    The steps, each recorded in the result's ``reasons``:

    1. **Memory ceiling**: with a ``budget`` (bytes), the largest batch whose real training step fits
       it (``nbbatch.memory.find_max_batch_size``, 5% margin, searched up to the data set size, guided
       by a line through two small trials).
       Without one, memory is not a bound on the CPU; on CUDA the free device memory is the budget.
    2. **Throughput**: examples per second at each candidate up to the ceiling
       (``nbbatch.memory.measure``, the median of ``timed_steps`` steps each; the best of ``rounds``
       rounds over all the sizes, so a burst of other load spoils one round only), stopping
       when ``time_budget_s`` is spent), and the knee: the last batch size reached while every
       doubling still gave at least ``min_gain`` times the throughput. Beyond the knee a bigger batch
       no longer shortens training by enough to pay for it.
    3. **Gradient noise scale**: ``torch.manual_seed(seed); model_fn()`` is trained for ``warmup_steps``
       steps at ``base_batch_size`` (lr ``lr``), then ``B_simple`` is measured exactly on up to
       ``noise_sample`` training examples (``nbbatch.diagnostics.gradient_noise_scale``). ``B_simple``
       estimates the critical batch: below it doubling the batch nearly halves the steps, above it
       the gain fades. It grows as the loss falls, so an early measurement is a cautious one.
    4. **Recommendation**: the largest candidate at most ``min(ceiling, knee, noise_factor x B_simple,
       N)``, and the learning rate to start re-tuning from, ``scale_lr(lr, B, base_batch_size,
       scale_rule)``; with ``lr_find_steps`` an LR range test (``nbbatch.diagnostics.lr_find``) at
       the recommended batch size is run as well.

    The validation accuracy is never consulted: re-tuned, every batch size reaches the same result;
    the batch size is chosen for training speed.

    Args:
        model_fn: builds a fresh model (called with no arguments).
        data: a DataBundle (its training split), a pair ``(x, y)`` of tensors or a TensorDataset.
        budget: bytes of memory for the training step (None: see step 1).
        candidates: increasing batch sizes to consider (default: powers of two from 8 to ``N``);
            those above ``N`` are dropped.
        lr: a learning rate that works at ``base_batch_size`` (warm-up training and the scaled lr).
        optimizer: the Trainer's optimizer (its state counts in memory).
        base_batch_size: the batch size of the warm-up training and of ``lr``.
        scale_rule: ``"linear"``, ``"sqrt"`` or ``"none"`` (``nbbatch.schedules.scale_lr``).
        warmup_steps: training steps before the noise scale is measured (>= 0).
        noise_factor: the noise bound is ``noise_factor * B_simple`` (1: the critical batch, where a
            run takes twice the fewest steps and twice the fewest examples; 1/3: the perfect-scaling
            regime proper).
        noise_sample: examples for the noise scale (None: all).
        min_gain: the throughput factor a doubling must give to count as speeding up (1 < g <= 2).
        knee_method: ``"doubling"`` (walk the points, ``find_knee``) or ``"fit"`` (a fitted step-time
            line, ``fit_step_time``; less moved by one noisy point).
        timed_steps: timed steps per batch size (medians; >= 1).
        rounds: rounds of the throughput measurement; each batch size keeps its best (>= 1).
        time_budget_s: seconds for the throughput measurement (None: every candidate).
        max_batch_size, throughput, noise_scale: evidence measured elsewhere, used instead of steps 1, 2
            or 3: an int; ``{batch_size: examples/s}`` or a ``MemoryReport``; a number or a ``NoiseScale``.
        lr_find_steps: steps of an LR range test at the recommended batch size (0: none).
        seed: seed of the model, the warm-up training and the noise sample.
        **train_options: further ``TrainConfig`` options (``device``, ``precision``, ``loss``,
            ``weight_decay``, ...), used by every step.

    Returns:
        :class:`BatchSizeChoice`.

    Example (with the evidence given, nothing is trained):
        >>> from nbbatch import models
        >>> x, y = torch.randn(4000, 40), torch.randint(0, 10, (4000,))
        >>> eps = {b: 1000.0 * min(b, 128) for b in (16, 32, 64, 128, 256, 512)}   # saturates at 128
        >>> c = choose_batch_size(models.MLP, (x, y), max_batch_size=1000, throughput=eps, noise_scale=300.0)
        >>> c.batch_size, c.limited_by, c.knee, c.suggested_lr
        (128, 'throughput', 128, 0.2)
    """
    t_start = time.perf_counter()
    # ---- every input checked before anything is built or trained ----------------------------
    if not callable(model_fn) or isinstance(model_fn, nn.Module):
        raise TypeError(f"model_fn must be a function that builds a model (e.g. models.MLP or "
                        f"lambda: models.MLP(40, (100,), 10)), got {type(model_fn).__name__}")
    x, y = train_tensors(data)
    n = len(x)
    cands = _check_candidates(candidates, n)
    if budget is not None and (not is_int(budget) or budget < 1):
        raise ValueError(f"budget must be a positive int of bytes (e.g. 2**30) or None, got {budget!r}")
    lr = _check_number("lr", lr)
    if not is_int(base_batch_size) or base_batch_size < 1 or base_batch_size > n:
        raise ValueError(f"base_batch_size must be an int in [1, {n}] (the data set's size), got {base_batch_size!r}")
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={scale_rule!r} is not known; use one of {SCALE_RULES}")
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    noise_factor = _check_number("noise_factor", noise_factor)
    if noise_sample is not None and (not is_int(noise_sample) or noise_sample < 2):
        raise ValueError(f"noise_sample must be an int >= 2 or None (every example), got {noise_sample!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 1 < min_gain <= 2:
        raise ValueError(f"min_gain must lie in (1, 2] (the throughput factor a doubling must give), got {min_gain!r}")
    if knee_method not in KNEE_METHODS:
        raise ValueError(f"knee_method must be one of {KNEE_METHODS}, got {knee_method!r}")
    if not is_int(timed_steps) or timed_steps < 1:
        raise ValueError(f"timed_steps must be a positive int, got {timed_steps!r}")
    if not is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    time_budget_s = _check_number("time_budget_s", time_budget_s, allow_none=True)
    if max_batch_size is not None and (not is_int(max_batch_size) or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
    given_throughput = None if throughput is None else _check_throughput(throughput)
    if isinstance(noise_scale, NoiseScale):
        noise_scale = noise_scale.b_simple
    noise_scale = _check_number("noise_scale", noise_scale, allow_none=True)
    if not is_int(lr_find_steps) or lr_find_steps < 0 or lr_find_steps == 1:
        raise ValueError(f"lr_find_steps must be 0 (no range test) or an int >= 2, got {lr_find_steps!r}")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    clash = sorted(set(train_options) & set(_OWN_OPTIONS))
    if clash:
        raise ValueError(f"{', '.join(clash)}: set by choose_batch_size itself; use its own arguments "
                         f"(candidates, lr, optimizer, seed, base_batch_size, scale_rule)")
    options = dict(train_options, optimizer=optimizer, lr=lr)
    try:
        config = TrainConfig(batch_size=base_batch_size, seed=seed, **options)
    except TypeError as err:
        raise TypeError(f"train_options: {err}") from None
    device = resolve_device(config.device)

    # the recipe seeds torch for its models and runs: the caller's generators are left as they were
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        choice = _recipe(model_fn, x, y, cands, budget, options, device, seed, base_batch_size, warmup_steps,
                         noise_factor, noise_sample, min_gain, knee_method, timed_steps, rounds, time_budget_s,
                         max_batch_size, given_throughput, noise_scale, lr, scale_rule, lr_find_steps)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    choice.seconds = time.perf_counter() - t_start
    return choice


def _recipe(model_fn, x, y, cands, budget, options, device, seed, base_batch_size, warmup_steps, noise_factor,
            noise_sample, min_gain, knee_method, timed_steps, rounds, time_budget_s, max_batch_size, given_throughput,
            noise_scale, lr, scale_rule, lr_find_steps) -> BatchSizeChoice:
    n = len(x)
    reasons: list[str] = []
    sources: dict[str, str] = {}
    bounds: dict[str, float] = {}
    model = None

    def fresh_model() -> nn.Module:
        torch.manual_seed(seed)
        m = model_fn()
        if not isinstance(m, nn.Module):
            raise TypeError(f"model_fn must return a torch.nn.Module, got {type(m).__name__}")
        return m

    # ---- 1. memory ceiling ---------------------------------------------------------------------
    ceiling = None
    if max_batch_size is not None:
        ceiling, sources["memory"] = max_batch_size, "given"
        reasons.append(f"memory: the largest batch that fits was given as {ceiling}.")
    elif budget is not None or device.type == "cuda":
        model = fresh_model()
        found = memory.find_max_batch_size(model, (x, y), budget=budget, limit=n, strategy="model", **options)
        ceiling, budget, sources["memory"] = found.batch_size, found.budget, "measured"
        reasons.append(f"memory: the largest batch whose training step fits {budget / 2**20:.1f} MiB "
                       f"(with a 5% margin) is {ceiling}" + (" (the whole data set)." if ceiling >= n else "."))
    else:
        sources["memory"] = "none"
        reasons.append(f"memory: no budget given on {describe_device(device)}, so memory sets no bound.")
    if ceiling is not None:
        bounds["memory"] = float(ceiling)

    # ---- 2. throughput and its knee --------------------------------------------------------------
    top = min(ceiling if ceiling is not None else n, n)
    if given_throughput is not None:
        eps, sources["throughput"] = given_throughput, "given"
    else:
        model = model if model is not None else fresh_model()
        sources["throughput"] = "measured"
        eps = _measure_rounds(model, x, y, [c for c in cands if c <= top], options, timed_steps, rounds,
                              time_budget_s, reasons)
    knee, saturated = _knee(eps, min_gain, knee_method)
    if knee is not None:
        bs = sorted(eps)
        span = f"throughput: {eps[bs[0]]:.0f} examples/s at B={bs[0]}, {eps[bs[-1]]:.0f} at B={bs[-1]}; "
        unmeasured = [c for c in cands if bs[-1] < c <= top]
        if saturated or unmeasured:
            bounds["throughput"] = float(knee)
            reasons.append(span + f"doubling the batch gives at least {min_gain:g}x the throughput up to B={knee} "
                           f"({knee_method})" + (", so larger batches no longer train enough faster." if saturated else
                                                 ", the largest batch measured: a cautious bound."))
        else:
            reasons.append(span + f"throughput still grows at least {min_gain:g}x per doubling up to the largest "
                           f"candidate, so the hardware sets no bound here.")
    else:
        reasons.append("throughput: fewer than two batch sizes measured, so no knee; throughput sets no bound.")

    # ---- 3. gradient noise scale after a short warm-up ---------------------------------------------
    warm_loss, warm_steps = None, None
    if noise_scale is not None:
        b_simple, sources["noise scale"] = noise_scale, "given"
        reasons.append(f"noise scale: B_simple was given as {b_simple:.1f}.")
    else:
        model = fresh_model()   # untouched by the memory and throughput steps, but start clean
        trainer = Trainer(model, (x, y), batch_size=base_batch_size, seed=seed, **options)
        if warmup_steps:
            history = trainer.fit(steps=warmup_steps)
            warm_loss = float(sum(history.steps["loss"][-10:]) / len(history.steps["loss"][-10:]))
        warm_steps = warmup_steps
        sample = None if noise_sample is None or noise_sample >= n else noise_sample
        ns = diagnostics.gradient_noise_scale(model, (x, y), loss=trainer.config.loss, sample=sample, seed=seed)
        b_simple, sources["noise scale"] = ns.b_simple, "measured"
        after = f" (training loss {warm_loss:.3f})" if warm_loss is not None else ""
        reasons.append(f"noise scale: after {warmup_steps} warm-up steps at B={base_batch_size}{after}, "
                       f"B_simple = {b_simple:.1f} on {ns.examples} examples: about the critical batch, "
                       f"beyond which a bigger batch saves ever fewer steps.")
    bounds["noise scale"] = noise_factor * b_simple
    bounds["data set"] = float(n)

    # ---- 4. the recommendation ---------------------------------------------------------------------
    limited_by = min(bounds, key=bounds.get)
    limit = bounds[limited_by]
    below = [c for c in cands if c <= limit]
    chosen = max(below) if below else max(1, int(math.floor(limit)))
    reasons.append(f"recommendation: the largest candidate at most min({', '.join(f'{k} {v:.0f}' for k, v in bounds.items())})"
                   f" = {limit:.0f} is B={chosen}" + ("" if below else " (below every candidate: the bound itself)")
                   + "; the validation accuracy plays no part.")
    suggested = scale_lr(lr, chosen, base_batch_size, scale_rule)
    reasons.append(f"learning rate: {lr:g} at B={base_batch_size} scaled by the {scale_rule} rule gives {suggested:.4g} "
                   f"at B={chosen}; re-tune it (diagnostics.lr_find) with a warm-up and a decay schedule.")
    found_lr = None
    if lr_find_steps:
        model = fresh_model()
        trainer = Trainer(model, (x, y), batch_size=chosen, seed=seed, **dict(options, lr=suggested))
        found_lr = diagnostics.lr_find(trainer, steps=lr_find_steps)
        reasons.append(f"lr range test at B={chosen}: suggested lr {found_lr.suggested_lr:.4g}.")
    return BatchSizeChoice(
        batch_size=chosen, limit=limit, limited_by=limited_by, bounds=bounds, max_batch_size=ceiling,
        budget=budget, throughput=eps, knee=knee, min_gain=float(min_gain), knee_method=knee_method,
        b_simple=b_simple, noise_factor=noise_factor, warmup_steps=warm_steps, warmup_loss=warm_loss,
        dataset_size=n, candidates=cands, lr=lr, base_batch_size=base_batch_size, scale_rule=scale_rule,
        suggested_lr=suggested, lr_find=found_lr, sources=sources, reasons=reasons,
        device=describe_device(device))
