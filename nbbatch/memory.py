"""Memory and throughput against batch size: measure, model, find, trade off, plan.

- :func:`measure` runs real Trainer steps at a list of batch sizes and reports peak training-step
  memory with its parts, time per step and examples per second (:class:`MemoryReport`).
  On CUDA the peak comes from the caching allocator (``max_memory_allocated`` after a reset).
  On the CPU, which keeps no allocator statistics, it comes from exact accounting
  (:func:`account_step`): parameters and buffers + gradients + optimizer state + the tensors
  autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` with
  each storage counted once, at the moment the most of them are alive.
- :class:`MemoryModel` fits ``fixed + per_example * B`` to those points; ``max_batch_size``
  answers "what fits in this budget".
- :func:`find_max_batch_size` searches (grow then bisect, or guided by a line through two small
  trials) for the largest batch whose real training step fits, restoring model, optimizer and
  RNG state afterwards.
- :func:`find_knee` and :func:`fit_step_time` mark where doubling the batch stops nearly
  doubling throughput.
- :func:`checkpointed` wraps an ``nn.Sequential`` for activation checkpointing
  (``torch.utils.checkpoint``), the Trainer's ``checkpoint_segments`` option;
  :class:`Checkpointed` marks single blocks of any model (both defined in ``nbbatch.recompute``,
  below the Trainer, with the saved-tensor counter; re-exported here).
- :func:`compare` measures configurations side by side; :func:`plan` turns a target batch and a
  budget into micro-batch, accumulation, learning rate and warm-up (``Trainer.from_plan``).

Written by hand: the saved-tensor accounting (no maintained library counts the bytes a CPU
training step keeps alive) and the batch-size search (the peers' versions are tied to their
trainers). Everything else is torch: ``torch.utils.checkpoint``, ``torch.autocast``,
``torch.cuda`` memory statistics.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .checks import is_int
from .batching import as_tensors
from .config import TrainConfig
from .device import describe_device, process_peak_rss_bytes, resolve_device, resolve_precision
# activation recomputation lives below the Trainer (nbbatch.recompute); its names are importable from here too
from .recompute import Checkpointed, CheckpointedSequential, SavedCounter, checkpointed, storage_key
from .schedules import SCALE_RULES, scale_lr
from .trainer import Trainer

__all__ = [
    "Checkpointed",
    "CheckpointedSequential",
    "Comparison",
    "FinderResult",
    "MemoryModel",
    "MemoryReport",
    "Plan",
    "account_step",
    "checkpointed",
    "compare",
    "find_knee",
    "fit_step_time",
    "find_max_batch_size",
    "measure",
    "plan",
]

PARTS = ("params", "grads", "optimizer", "activations")
ROUNDINGS = (None, 8, "pow2")


# ====================================================================== checks
def _check_batch_sizes(batch_sizes) -> list[int]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise TypeError(f"batch_sizes must be a list of positive ints, got {batch_sizes!r}")
    if len(batch_sizes) == 0:
        raise ValueError("batch_sizes is empty; give at least one batch size, e.g. [32, 64, 128]")
    bad = [b for b in batch_sizes if not is_int(b) or b < 1]
    if bad:
        raise ValueError(f"batch_sizes must be positive ints, got {list(batch_sizes)!r} (bad: {bad!r})")
    return sorted(set(int(b) for b in batch_sizes))


def _check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
    return int(budget)


def _check_round_to(round_to):
    if round_to not in ROUNDINGS:
        raise ValueError(f"round_to must be None, 8 or 'pow2', got {round_to!r}")
    return round_to


def _round_down(b: int, round_to) -> int:
    if round_to == 8:
        return (b // 8) * 8
    if round_to == "pow2":
        return 1 << (b.bit_length() - 1) if b >= 1 else 0
    return b


def _mib(n: float) -> float:
    return n / 2**20


# ====================================================================== exact accounting (CPU)
def _unique_bytes(tensors) -> int:
    seen: dict = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key, n = storage_key(t)
            seen[key] = n
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


@dataclass(frozen=True)
class MemoryParts:
    """Bytes of one accounted training step, by part.

    ``params`` (parameters and buffers), ``grads``, ``optimizer`` (its state), ``saved`` (the
    largest total of tensors saved for backward alive at once in the forward, parameters and
    buffers excluded). Under activation checkpointing also ``kept`` (the chunk inputs, part of
    ``saved``) and ``recompute`` (the activations of the largest chunk, recomputed in backward).
    ``fixed`` is the part that does not depend on the batch size; ``total`` is
    ``fixed + max(saved, kept + recompute)``: the end of the forward, or the recomputation in
    backward with every chunk input still kept (an upper bound: later chunks are freed by then).
    """

    params: int
    grads: int
    optimizer: int
    saved: int
    recompute: int = 0
    kept: int = 0

    @property
    def fixed(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def activations(self) -> int:
        return max(self.saved, self.kept + self.recompute)

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def as_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "saved": self.saved, "recompute": self.recompute, "kept": self.kept,
                "activations": self.activations, "total": self.total}


def account_step(trainer) -> MemoryParts:
    """Run one real training step of ``trainer`` and count the bytes it keeps alive, by part.

    This is the CPU's memory measurement (exact accounting; no allocator statistics exist
    there). It does train: the step updates the model like ``trainer.step()``.
    Transient buffers that autograd does not save (the gradient flowing backward, kernel
    workspace) are not counted.

    Args:
        trainer: a :class:`~nbbatch.trainer.Trainer`.

    Returns:
        :class:`MemoryParts`.

    Example:
        >>> import torch
        >>> from nbbatch import Trainer
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        >>> t = Trainer(MLP(40, (100,), 10), (x, y), batch_size=64, optimizer="adam")
        >>> parts = account_step(t)
        >>> parts.params == parts.grads == 4 * (40 * 100 + 100 + 100 * 10 + 10)
        True
        >>> parts.saved == 64 * 4 * (40 + 100 + 10) + 64 * 8 + 4  # input, ReLU out, log-probs, labels
        True
    """
    model, optimizer = trainer.model, trainer.optimizer
    params = list(model.parameters())
    # parameters and buffers are counted in ``params``; autograd saves some of them (weights,
    # and batch norm's running statistics in eval mode): not a second time in ``saved``
    exclude = {storage_key(t)[0] for t in params + list(model.buffers())}
    counter = SavedCounter(exclude)
    with counter:
        trainer.step()
    return MemoryParts(
        params=_unique_bytes(list(params) + list(model.buffers())),
        grads=_unique_bytes(p.grad for p in params if p.grad is not None),
        optimizer=_unique_bytes(_optimizer_tensors(optimizer)),
        saved=counter.peak,
        recompute=counter.recompute,
        kept=counter.kept,
    )


# ====================================================================== measurement
def _sample_of(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) tensors from a DataBundle, tensors, a TensorDataset, a Dataset, a DataLoader or a Trainer.

    Memory and speed do not depend on the values, so a Dataset or DataLoader gives one sample
    (its first batch, or its first 256 examples) that is repeated to any batch size.
    """
    if isinstance(data, Trainer):
        data = data._train.whole()
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train
    xy = as_tensors(data)
    if xy is not None:
        return xy
    if isinstance(data, DataLoader):
        # a shuffling loader's sampler draws from the global RNG: the caller's stays as it was
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(data))
        return batch[0], batch[1]
    if isinstance(data, Dataset) and hasattr(data, "__len__") and len(data) > 0:
        items = [data[i] for i in range(min(len(data), 256))]
        return (torch.stack([torch.as_tensor(it[0]) for it in items]),
                torch.stack([torch.as_tensor(it[1]) for it in items]))
    raise TypeError(f"data must be a DataBundle, a pair (x, y) of tensors, a Dataset or a DataLoader, "
                    f"got {type(data).__name__}")


def _tile(x: torch.Tensor, y: torch.Tensor, n: int):
    """``n`` examples, repeating the data when it has fewer (memory does not depend on values)."""
    if len(x) == 0:
        raise ValueError("data is empty")
    idx = torch.arange(n, device=x.device) % len(x)
    return x[idx], y[idx]


def _make_config(config, options: Mapping, batch_size: int):
    cfg = TrainConfig(**options) if config is None else config.replace(**options)
    # Memory and speed do not depend on the lr schedule: a constant one needs no run length.
    return cfg.replace(batch_size=batch_size, warmup="none", warmup_steps=None, warmup_epochs=None,
                       decay="constant", decay_steps=None, decay_epochs=None, total_steps=None,
                       total_epochs=None, eval_every=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(err, (oom, MemoryError)):
        return True
    # CUDA/MPS say "out of memory"; the CPU allocator raises a plain RuntimeError of its own words
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def _release_after_oom(err: BaseException, device: torch.device) -> None:
    # The traceback's frames hold the step's tensors: clear them; on CUDA also collect what
    # reference cycles still hold and give the cached blocks back, so memory returns to its baseline.
    traceback.clear_frames(err.__traceback__)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class _State:
    """A CPU copy of what a trial step changes: model, grads, optimizer, training flag, RNG."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.grads = [None if p.grad is None else p.grad.detach().to("cpu", copy=True) for p in model.parameters()]
        self.opt = _to_cpu(optimizer.state_dict()) if optimizer is not None else None
        self.training = model.training
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.weights[k])
            for p, g in zip(self.model.parameters(), self.grads):
                p.grad = None if g is None else g.to(p.device, copy=True)
        if self.optimizer is not None:
            # load_state_dict keeps the given tensors when no cast is needed: hand it a copy, so
            # the next trial's in-place updates cannot reach the snapshot
            self.optimizer.load_state_dict(_to_cpu(self.opt))
        self.model.train(self.training)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _trial(model, x, y, cfg, *, optimizer=None, steps: int = 2, timed: int = 0, account: bool | None = None) -> dict:
    """Real Trainer steps at ``cfg.batch_size`` on ``model`` (changed: the caller restores it).

    Returns a row: memory parts (CPU) or the allocator's peak (CUDA), time per step, examples/s.
    """
    B = cfg.batch_size
    xb, yb = _tile(x, y, B)
    trainer = Trainer(model, (xb, yb), cfg)
    device = trainer.device
    if optimizer is not None:
        trainer.optimizer = optimizer   # the user's optimizer, so its existing state is counted
    account = device.type != "cuda" if account is None else account
    row: dict[str, Any] = {"batch_size": B}
    # Steps before the measured one create the optimizer state (it exists from the second step on).
    for _ in range(max(steps - 1, 0)):
        trainer.step()
    if account:
        row.update(account_step(trainer).as_dict())
        row["method"] = "accounting"
    else:
        # The allocator's peak during one step, less what was allocated before it that is not
        # training state (the data, the caller's other tensors), so the total is comparable with
        # the accounting: parameters + gradients + optimizer state + everything the step allocates.
        params = list(trainer.model.parameters())
        state = _unique_bytes(params + list(trainer.model.buffers())) \
            + _unique_bytes(p.grad for p in params if p.grad is not None) \
            + _unique_bytes(_optimizer_tensors(trainer.optimizer))
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step()
        _sync(device)
        row["total"] = int(torch.cuda.max_memory_allocated(device) - before + state)
        row["method"] = "allocator"
    times = []
    for _ in range(timed):
        _sync(device)
        t0 = time.perf_counter()
        trainer.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if times:
        t = statistics.median(times)
        row["time_per_step"] = t
        row["examples_per_s"] = B / t if t > 0 else float("inf")
    return row


@dataclass
class MemoryReport:
    """Memory and speed of a training step at several batch sizes (from :func:`measure`).

    ``rows`` holds one dict per batch size: ``batch_size``, the parts in bytes (CPU accounting)
    or ``total`` alone (CUDA allocator), ``time_per_step`` (s, median), ``examples_per_s``,
    ``rss_peak`` (the process's peak resident memory, a CPU cross-check), ``method``.
    """

    rows: list[dict]
    device: str
    label: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def batch_sizes(self) -> list[int]:
        return [r["batch_size"] for r in self.rows]

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.rows]

    def to_pandas(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd
        return pd.DataFrame(self.rows)

    def fit(self) -> "MemoryModel":
        """Fit ``fixed + per_example * B`` to the measured totals (:class:`MemoryModel`)."""
        ok = [r for r in self.rows if r.get("total") is not None and not r.get("oom")]
        return MemoryModel.fit([r["batch_size"] for r in ok], [r["total"] for r in ok])

    def knee(self, min_gain: float = 1.8, method: str = "doubling") -> int | None:
        """The throughput knee: ``"doubling"`` walks the measured points (:func:`find_knee`);
        ``"fit"`` takes the largest measured batch size below the knee of the fitted step-time
        line (:func:`fit_step_time`), which one noisy point does not move."""
        ok = [r for r in self.rows if r.get("examples_per_s")]
        if method not in ("doubling", "fit"):
            raise ValueError(f"method must be 'doubling' or 'fit', got {method!r}")
        if not ok:
            return None
        bs = [r["batch_size"] for r in ok]
        if method == "doubling":
            return find_knee(bs, [r["examples_per_s"] for r in ok], min_gain=min_gain)
        knee = fit_step_time(bs, [r["time_per_step"] for r in ok], min_gain)["knee"]
        below = [b for b in bs if b <= knee]
        return max(below) if below else bs[0]

    def __repr__(self) -> str:
        lines = [f"MemoryReport({self.label or 'measure'} on {self.device})"]
        for r in self.rows:
            mem = "OOM" if r.get("oom") else f"{_mib(r['total']):9.3f} MiB"
            speed = f", {r['examples_per_s']:10.0f} ex/s" if r.get("examples_per_s") else ""
            lines.append(f"  B={r['batch_size']:>6}: {mem}{speed}")
        return "\n".join(lines)

    def plot(self, budget: int | None = None, ax=None):
        """Measured memory by part against batch size, with the fitted line and ``budget``."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.6))
        bs = [r["batch_size"] for r in self.rows if not r.get("oom")]
        if all(p in self.rows[0] for p in PARTS):
            bottom = [0.0] * len(bs)
            for part in PARTS:
                vals = [_mib(r[part]) for r in self.rows if not r.get("oom")]
                if any(vals):
                    top = [a + b for a, b in zip(bottom, vals)]
                    ax.fill_between(bs, bottom, top, alpha=0.5, label=part, step=None)
                    bottom = top
        if len(set(bs)) >= 2:
            self.fit().plot(ax=ax, budget=budget)
        else:
            ax.plot(bs, [_mib(r["total"]) for r in self.rows if not r.get("oom")], "ko", label="measured")
        ax.set_title(f"training-step memory ({self.device})")
        return ax

    def plot_throughput(self, min_gain: float = 1.8, axes=None):
        """Examples/s and time/step against batch size, the knee marked."""
        import matplotlib.pyplot as plt
        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        ok = [r for r in self.rows if r.get("examples_per_s")]
        bs = [r["batch_size"] for r in ok]
        axes[0].plot(bs, [r["examples_per_s"] for r in ok], "o-")
        axes[0].set(xscale="log", yscale="log", xlabel="batch size", ylabel="examples / s", title="throughput")
        axes[1].plot(bs, [1e3 * r["time_per_step"] for r in ok], "o-")
        axes[1].set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms / step", title="time per step")
        if len(bs) >= 2:
            for method, style in (("doubling", "--"), ("fit", ":")):
                knee = self.knee(min_gain, method)
                for a in axes:
                    a.axvline(knee, color="C3" if method == "doubling" else "C2", ls=style,
                              label=f"knee ({method}) B={knee}")
            fit = fit_step_time(bs, [r["time_per_step"] for r in ok], min_gain)
            grid = sorted(set(bs))
            axes[1].plot(grid, [1e3 * (fit["overhead"] + fit["per_example"] * b) for b in grid], "k--", lw=0.8,
                         label="fit: overhead + per-example")
            axes[0].legend(fontsize=8)
            axes[1].legend(fontsize=8)
        return axes


def measure(model: nn.Module, data, batch_sizes: Sequence[int], config=None, *, steps: int = 3,
            label: str = "", **options) -> MemoryReport:
    """Measure training-step memory and speed of ``model`` at each batch size.

    Each batch size runs real Trainer steps (forward, backward, optimizer) on a copy of
    ``model`` (the model itself is not changed), with ``steps`` timed steps after one accounted
    step (CPU) or allocator-measured step (CUDA). The data is repeated when it has fewer
    examples than a batch (memory and speed do not depend on the values).

    Args:
        model: the ``nn.Module``.
        data: a DataBundle, a pair ``(x, y)`` of tensors or a TensorDataset.
        batch_sizes: the batch sizes (positive ints; measured in increasing order).
        config: a ``TrainConfig`` (precision, accumulate, optimizer, checkpoint_segments, ...).
        steps: timed steps per batch size (0: memory only).
        label: a name for the configuration (shown by ``compare``).
        **options: ``TrainConfig`` fields overriding ``config``.

    Returns:
        :class:`MemoryReport`; an out-of-memory batch size gets a row with ``oom=True`` and the
        larger ones are skipped.

    Example:
        >>> import torch
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(256, 40), torch.randint(0, 10, (256,))
        >>> r = measure(MLP(40, (100,), 10), (x, y), [32, 64], steps=0, device="cpu")
        >>> r.batch_sizes, r.rows[1]["saved"] == 2 * r.rows[0]["saved"] - 4
        ([32, 64], True)
    """
    sizes = _check_batch_sizes(batch_sizes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    x, y = _sample_of(data)
    configs = [_make_config(config, options, b) for b in sizes]   # every config checked before running any
    device = resolve_device(configs[0].device)
    resolve_precision(configs[0].precision, device)
    rows = []
    # the trial Trainers seed torch (the CPU and every CUDA device): the caller's RNG is left as
    # it was, also when a trial raises
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        for cfg in configs:
            work = copy.deepcopy(model)
            try:
                # CUDA: the allocator's peak of the second step, when the optimizer state (and the
                # library workspaces) exist, as in the finder; the CPU accounting counts the state after step one
                row = _trial(work, x, y, cfg, steps=2 if device.type == "cuda" else 1, timed=steps)
            except BaseException as err:   # noqa: B902 - only out-of-memory is handled, the rest re-raised
                if not _is_oom(err):
                    raise
                _release_after_oom(err, device)
                rows.append({"batch_size": cfg.batch_size, "oom": True, "total": None, "config": label})
                break
            finally:
                del work
            row["rss_peak"] = process_peak_rss_bytes() if device.type == "cpu" else None
            row["config"] = label
            rows.append(row)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return MemoryReport(rows, describe_device(device), label)


# ====================================================================== memory model
@dataclass(frozen=True)
class MemoryModel:
    """Training-step memory as ``fixed + per_example * batch_size`` (bytes), fitted by least squares.

    Example:
        >>> m = MemoryModel.fit([32, 64, 128], [1000 + 32 * 10, 1000 + 64 * 10, 1000 + 128 * 10])
        >>> round(m.fixed), round(m.per_example), round(m.predict(256)), m.max_batch_size(2000)
        (1000, 10, 3560, 100)
    """

    fixed: float
    per_example: float
    batch_sizes: tuple = ()
    measured: tuple = ()

    @classmethod
    def fit(cls, batch_sizes: Sequence[int], totals: Sequence[float]) -> "MemoryModel":
        """Least-squares line through ``(batch_size, total bytes)``; needs two distinct batch sizes."""
        if len(batch_sizes) != len(totals):
            raise ValueError(f"batch_sizes ({len(batch_sizes)}) and totals ({len(totals)}) differ in length")
        if len(set(batch_sizes)) < 2:
            raise ValueError(f"fitting a memory model needs at least two distinct batch sizes, got {list(batch_sizes)}")
        n = len(batch_sizes)
        mx, my = sum(batch_sizes) / n, sum(totals) / n
        sxx = sum((b - mx) ** 2 for b in batch_sizes)
        slope = sum((b - mx) * (t - my) for b, t in zip(batch_sizes, totals)) / sxx
        return cls(my - slope * mx, slope, tuple(batch_sizes), tuple(totals))

    def predict(self, batch_size) -> float:
        """Predicted bytes at ``batch_size``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, float)) or batch_size < 0:
            raise ValueError(f"batch_size must be a number >= 0, got {batch_size!r}")
        return self.fixed + self.per_example * batch_size

    def predict_runs(self, batch_size, runs: int) -> float:
        """Predicted bytes of ``runs`` runs trained as one ``nbbatch.runs.MultiRun`` at ``batch_size``.

        The stacked runs hold ``runs`` times the parameters, gradients and optimizer state, and
        their step keeps ``runs`` times one run's activations (``runs * batch_size`` rows), so the
        whole line scales: ``runs * (fixed + per_example * batch_size)``.

        Example:
            >>> MemoryModel(1000.0, 10.0).predict_runs(64, 8)
            13120.0
        """
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs must be a positive int, got {runs!r}")
        return runs * self.predict(batch_size)

    def max_runs(self, budget, batch_size) -> int:
        """The most runs at ``batch_size`` that fit in ``budget`` bytes trained as one MultiRun (0: none)."""
        budget = _check_budget(budget)
        return int(math.floor(budget / self.predict(batch_size) + 1e-9))

    def max_batch_size(self, budget, round_to=None) -> int:
        """The largest batch size whose predicted memory fits in ``budget`` bytes.

        Raises:
            ValueError: when the budget is below the fixed cost (the model alone does not fit),
                or not even one example fits.
        """
        budget = _check_budget(budget)
        _check_round_to(round_to)
        if budget < self.fixed:
            raise ValueError(f"budget={budget} bytes ({_mib(budget):.2f} MiB) is below the fixed cost "
                             f"{self.fixed:.0f} bytes ({_mib(self.fixed):.2f} MiB): the model alone (parameters, "
                             f"gradients, optimizer state) does not fit")
        if self.per_example <= 0:
            raise ValueError("the fitted per-example cost is not positive: memory does not grow with the batch "
                             "in these measurements, so no largest batch follows from them")
        b = int(math.floor((budget - self.fixed) / self.per_example + 1e-9))
        b = _round_down(b, round_to)
        if b < 1:
            raise ValueError(f"budget={budget} bytes leaves room for no example "
                             f"(fixed {self.fixed:.0f} + {self.per_example:.0f} per example)")
        return b

    def plot(self, ax=None, budget=None):
        """Measured points, the fitted line and (if given) the budget and the batch limit."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.6))
        top = max(self.batch_sizes)
        if budget is not None:
            limit = self.max_batch_size(budget)
            top = max(top, limit)
        xs = [0, top * 1.1]
        ax.plot(self.batch_sizes, [_mib(t) for t in self.measured], "ko", label="measured")
        ax.plot(xs, [_mib(self.predict(b)) for b in xs], "k--", lw=1,
                label=f"fit: {_mib(self.fixed):.2f} MiB + {self.per_example / 1024:.2f} KiB x B")
        if budget is not None:
            ax.axhline(_mib(budget), color="C3", lw=1, label=f"budget {_mib(budget):.1f} MiB")
            ax.axvline(limit, color="C3", ls=":", lw=1, label=f"predicted limit B={limit}")
        ax.set(xlabel="batch size", ylabel="MiB")
        ax.legend(fontsize=8)
        return ax


# ====================================================================== the finder
@dataclass
class FinderResult:
    """The answer of :func:`find_max_batch_size` and the trials that led to it."""

    batch_size: int
    largest_fitting: int
    trials: list[dict]
    budget: int
    seconds: float
    device: str

    def __repr__(self) -> str:
        return (f"FinderResult(batch_size={self.batch_size}, largest_fitting={self.largest_fitting}, "
                f"trials={len(self.trials)}, budget={_mib(self.budget):.2f} MiB)")


def find_max_batch_size(target, data=None, *, budget=None, margin: float = 0.05, start: int = 1,
                        limit: int = 2**20, round_to=None, steps: int = 2, strategy: str = "bisect",
                        config=None, **options) -> FinderResult:
    """The largest batch size whose real training step fits: grow by doubling, then bisect.

    A batch size fits when its step (forward, backward and the optimizer, at the second step so
    that the optimizer state exists) uses at most ``(1 - margin) * budget`` bytes: on CUDA the
    allocator's peak during the step less what was allocated before it that is not training state
    (with no out-of-memory error), on the CPU the exact accounting of :func:`account_step`. An out-of-memory error is caught, its frames
    cleared and the cache emptied. Model weights, gradients, optimizer state, training mode and
    RNG are restored after every trial, so the search leaves no trace.

    Args:
        target: a ``Trainer`` (its model, optimizer, configuration and data) or an ``nn.Module``.
        data: with a model: a DataBundle, ``(x, y)`` tensors or a TensorDataset (repeated as needed).
        budget: bytes available; required on the CPU; on CUDA defaults to the free device memory
            plus the allocator's cached blocks and the training state already on the device.
        margin: safety fraction of the budget left unused (0 <= margin < 1).
        start: first batch size tried.
        limit: largest batch size considered.
        round_to: None, ``8`` (a multiple of 8) or ``"pow2"`` (a power of two) for the answer.
        steps: training steps per trial (>= 1; the last is measured).
        strategy: ``"bisect"`` (grow by doubling, then bisect) or ``"model"`` (fit a line through
            two small trials, try its prediction and the next batch, gallop from there if it was
            off, then bisect): the same answer from fewer large trials when memory is near linear.
        config, **options: the training configuration (with a model).

    Example:
        >>> import torch
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        >>> r = find_max_batch_size(MLP(40, (100,), 10), (x, y), budget=2**20, margin=0, device="cpu")
        >>> r.batch_size
        1657
    """

    # A trainer's model is trained and restored trial by trial: no fit may run on it meanwhile.
    hold = target.exclusive("find_max_batch_size") if isinstance(target, Trainer) else contextlib.nullcontext()
    with hold:
        return _find_max_batch_size(target, data, budget=budget, margin=margin, start=start, limit=limit,
                                    round_to=round_to, steps=steps, strategy=strategy, config=config, **options)


def _find_max_batch_size(target, data, *, budget, margin, start, limit, round_to, steps, strategy, config,
                         **options) -> FinderResult:
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
        raise ValueError(f"margin must lie in [0, 1), got {margin!r}")
    if not is_int(start) or start < 1:
        raise ValueError(f"start must be a positive int, got {start!r}")
    if not is_int(limit) or limit < start:
        raise ValueError(f"limit must be an int >= start={start}, got {limit!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    _check_round_to(round_to)
    if strategy not in ("bisect", "model"):
        raise ValueError(f"strategy must be 'bisect' or 'model', got {strategy!r}")
    if budget is not None:
        budget = _check_budget(budget)   # before the model moves to the device
    if isinstance(target, Trainer):
        if data is not None or config is not None or options:
            raise ValueError("with a Trainer, give no data, config or options: the trainer's own are used")
        model, optimizer, base = target.model, target.optimizer, target.config
        x, y = _sample_of(target)
        device = target.device
    elif isinstance(target, nn.Module):
        if data is None:
            raise ValueError("data: give the data (a DataBundle or (x, y) tensors) with a model")
        model, optimizer = target, None
        x, y = _sample_of(data)
        base = TrainConfig(**options) if config is None else config.replace(**options)
        device = resolve_device(base.device)
        resolve_precision(base.precision, device)
        model.to(device)
    else:
        raise TypeError(f"target must be a Trainer or an nn.Module, got {type(target).__name__}")
    if budget is None:
        if device.type != "cuda":
            raise ValueError("budget: on the CPU the finder needs a byte budget, e.g. budget=2**30 (1 GiB)")
        # what training can use: free device memory, the allocator's cached blocks, and the
        # training state already there (counted in every trial's total)
        params = list(model.parameters())
        budget = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                  - torch.cuda.memory_allocated(device) + _unique_bytes(params + list(model.buffers()))
                  + _unique_bytes(p.grad for p in params if p.grad is not None)
                  + (_unique_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0))
    budget = _check_budget(budget)
    # Ghost batch norm normalises only batches its virtual batches fit (at least virtual_batch_size
    # examples, a multiple of it with remainder='error'): the search runs over those sizes only.
    floor = _ghost_floor(model, base.accumulate, start)
    if floor(limit) is None:
        raise ValueError(f"no batch size in [start={start}, limit={limit}] suits the model's ghost batch norm "
                         f"(virtual_batch_size={_virtual_sizes_of(model)}); raise limit")
    start = _ghost_ceiling(model, base.accumulate, start, limit)
    _make_config(base, {"accumulate": min(base.accumulate, start)}, start)   # a bad configuration fails here
    allowed = (1 - margin) * budget
    state = _State(model, optimizer)
    trials: list[dict] = []
    t0 = time.perf_counter()

    decided: dict[int, bool] = {}

    def fits(b: int) -> bool:
        b = floor(b)   # the largest size ghost batch norm accepts, at most b (b itself without ghost BN)
        if b in decided:
            return decided[b]
        cfg = _make_config(base, {"accumulate": min(base.accumulate, b)}, b)
        try:
            row = _trial(model, x, y, cfg, optimizer=optimizer, steps=steps)
            row["fits"] = row["total"] <= allowed
        except BaseException as err:   # noqa: B902 - only out-of-memory is handled, the rest re-raised
            if not _is_oom(err):
                raise
            _release_after_oom(err, device)
            row = {"batch_size": b, "oom": True, "fits": False}
        finally:
            state.restore()
        trials.append(row)
        decided[b] = row["fits"]
        return row["fits"]

    try:
        if not fits(start):
            first = trials[0]
            fixed = first.get("params", 0) + first.get("grads", 0) + first.get("optimizer", 0)
            if not fixed:   # CUDA rows carry no parts: parameters and gradients at least
                fixed = 2 * _unique_bytes(list(model.parameters()))
            if fixed > allowed:
                raise ValueError(f"budget={budget} bytes is below the fixed cost of {fixed} bytes: the model alone "
                                 f"(parameters, gradients, optimizer state) does not fit")
            raise ValueError(f"budget={budget} bytes: not even batch size start={start} fits "
                             f"(it needs {first.get('total', 'more than the device has')} bytes)")
        if strategy == "model":
            lo, hi = _guided_bracket(fits, trials, start, limit, allowed)
        else:
            lo, hi = _doubling_bracket(fits, start, limit)
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
    finally:
        state.restore()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    lo = floor(lo)
    answer = _round_down(lo, round_to)
    if answer < 1:
        raise ValueError(f"round_to={round_to!r}: the largest fitting batch {lo} rounds down to 0")
    if floor(answer) != answer:
        raise ValueError(f"round_to={round_to!r}: the largest fitting batch {lo} rounds down to {answer}, which "
                         f"the model's ghost batch norm cannot normalise; use round_to=None")
    return FinderResult(answer, lo, trials, budget, time.perf_counter() - t0, describe_device(device))


def _virtual_sizes_of(model: nn.Module) -> list[int]:
    return sorted({m.virtual_batch_size for m in model.modules() if hasattr(m, "virtual_sizes")})


def _ghost_accepts(layers: list, accumulate: int, b: int) -> bool:
    k = min(accumulate, b)
    q, r = divmod(b, k)
    for m in {q + 1, q} if r else {q}:   # the micro-batch sizes of a batch of b
        for layer in layers:
            try:
                layer.virtual_sizes(m)
            except ValueError:
                return False
    return True


def _ghost_floor(model: nn.Module, accumulate: int, start: int):
    """``floor(b)``: the largest batch size <= b (and >= start) the ghost layers accept, else None."""
    layers = [m for m in model.modules() if hasattr(m, "virtual_sizes")]
    if not layers:
        return lambda b: b
    cache: dict[int, int | None] = {}

    def floor(b: int) -> int | None:
        if b not in cache:
            cache[b] = next((c for c in range(b, start - 1, -1) if _ghost_accepts(layers, accumulate, c)), None)
        return cache[b]

    return floor


def _ghost_ceiling(model: nn.Module, accumulate: int, start: int, limit: int) -> int:
    layers = [m for m in model.modules() if hasattr(m, "virtual_sizes")]
    return next(c for c in range(start, limit + 1) if not layers or _ghost_accepts(layers, accumulate, c))


def _doubling_bracket(fits, lo: int, limit: int, step: int | None = None):
    """From a fitting ``lo``, grow (doubling, or by a doubling ``step``) to the first failure."""
    while lo < limit:
        b = min(2 * lo if step is None else lo + step, limit)
        if not fits(b):
            return lo, b
        lo = b
        step = None if step is None else 2 * step
    return lo, None


def _guided_bracket(fits, trials: list, start: int, limit: int, allowed: float):
    """Bracket the limit around the prediction of a line through two small trials.

    Real steps still decide: the prediction and its neighbour are tried, then the search gallops
    (steps doubling) up or down from there until it brackets the limit for the bisection.
    """
    second = min(limit, 2 * start)
    if second == start:
        return start, None
    if not fits(second):
        return start, second
    points = [t for t in trials if t.get("total") is not None][-2:]
    line = MemoryModel.fit([t["batch_size"] for t in points], [t["total"] for t in points])
    if line.per_example <= 0:
        return _doubling_bracket(fits, second, limit)
    guess = int(min(limit, max(second, math.floor((allowed - line.fixed) / line.per_example))))
    lo = second
    if guess > lo:
        if not fits(guess):          # the line was optimistic: gallop down from the guess
            hi, step = guess, max(1, guess // 64)
            while hi - step > lo:
                if fits(hi - step):
                    return hi - step, hi
                hi, step = hi - step, 2 * step
            return lo, hi
        lo = guess
    if lo >= limit:
        return lo, None
    if not fits(lo + 1):             # the usual end on the CPU, where the line is exact
        return lo, lo + 1
    return _doubling_bracket(fits, lo + 1, limit, step=max(2, lo // 64))


# ====================================================================== throughput knee
def find_knee(batch_sizes: Sequence[int], examples_per_s: Sequence[float], min_gain: float = 1.8) -> int:
    """The batch size after which growing the batch no longer nearly scales throughput.

    Walking up the batch sizes, a step from ``b`` to ``b'`` "scales" when throughput grows by at
    least ``min_gain ** log2(b'/b)`` (for a doubling: ``min_gain``, 1.8x by default, the Deep
    Learning Tuning Playbook's "nearly doubles"). The knee is the last batch size reached by
    scaling steps only; the first one when the first doubling already falls short.

    Args:
        batch_sizes: increasing batch sizes.
        examples_per_s: measured throughput at each.
        min_gain: throughput factor a doubling must give to count as scaling (1 < min_gain <= 2).

    Example:
        >>> bs = [8, 16, 32, 64, 128, 256]
        >>> find_knee(bs, [min(b, 64) * 100.0 for b in bs])   # saturates at 64
        64
    """
    sizes = _check_batch_sizes(batch_sizes)
    if list(batch_sizes) != sizes:
        raise ValueError(f"batch_sizes must be increasing and distinct, got {list(batch_sizes)!r}")
    if len(examples_per_s) != len(sizes):
        raise ValueError(f"examples_per_s has {len(examples_per_s)} values for {len(sizes)} batch sizes")
    if not all(isinstance(v, (int, float)) and v > 0 for v in examples_per_s):
        raise ValueError("examples_per_s must be positive numbers")
    if not isinstance(min_gain, (int, float)) or not 1 < min_gain <= 2:
        raise ValueError(f"min_gain must lie in (1, 2], got {min_gain!r}")
    knee = sizes[0]
    for (b0, t0), (b1, t1) in zip(zip(sizes, examples_per_s), zip(sizes[1:], examples_per_s[1:])):
        if t1 / t0 >= min_gain ** math.log2(b1 / b0) * (1 - 1e-12):
            knee = b1
        else:
            break
    return knee


def fit_step_time(batch_sizes: Sequence[int], time_per_step: Sequence[float], min_gain: float = 1.8) -> dict:
    """Fit ``time(B) = overhead + per_example * B`` and the knee that line implies.

    With that line a doubling from ``B`` gives ``2 (t0 + cB) / (t0 + 2cB)`` times the throughput,
    at least ``min_gain`` while ``B <= (2 - g) t0 / ((2g - 2) c)``: the knee of the fitted curve
    (``t0 / (8c)`` for ``g = 1.8``). Less sensitive to one noisy point than :func:`find_knee`.

    Args:
        batch_sizes: the batch sizes (at least two distinct).
        time_per_step: seconds per step at each.
        min_gain: as in :func:`find_knee`.

    Returns:
        ``{"overhead": t0 (s), "per_example": c (s), "knee": B (float, inf when c <= 0)}``.

    Example:
        >>> fit = fit_step_time([1, 8, 64], [0.001 + 1e-5 * b for b in (1, 8, 64)])
        >>> round(fit["overhead"], 6), round(fit["knee"], 2)
        (0.001, 12.5)
    """
    if not isinstance(min_gain, (int, float)) or not 1 < min_gain <= 2:
        raise ValueError(f"min_gain must lie in (1, 2], got {min_gain!r}")
    line = MemoryModel.fit(list(batch_sizes), list(time_per_step))
    t0, c = line.fixed, line.per_example
    knee = (2 - min_gain) * t0 / ((2 * min_gain - 2) * c) if c > 0 else float("inf")
    return {"overhead": t0, "per_example": c, "knee": knee}


# ====================================================================== compare
@dataclass
class Comparison:
    """Memory and time of several configurations at one batch size (from :func:`compare`)."""

    rows: list[dict]

    def to_pandas(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def __repr__(self) -> str:
        lines = ["Comparison"]
        for r in self.rows:
            if r.get("oom"):
                lines.append(f"  {r['config']:>16}: OOM")
                continue
            t = f", {1e3 * r['time_per_step']:.2f} ms/step ({r['time_ratio']:.2f}x)" if r.get("time_ratio") else ""
            ratio = f" ({r['memory_ratio']:.2f}x)" if r.get("memory_ratio") is not None else ""
            lines.append(f"  {r['config']:>16}: {_mib(r['total']):8.3f} MiB{ratio}{t}")
        return "\n".join(lines)

    def plot(self, axes=None):
        import matplotlib.pyplot as plt
        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        names = [r["config"] for r in self.rows]
        axes[0].barh(names, [_mib(r["total"] or 0) for r in self.rows])   # an out-of-memory row: no bar
        axes[0].set(xlabel="MiB", title="step memory")
        if all(r.get("time_per_step") for r in self.rows):
            axes[1].barh(names, [1e3 * r["time_per_step"] for r in self.rows], color="C1")
            axes[1].set(xlabel="ms / step", title="time per step")
        return axes


def compare(model: nn.Module, data, configs: Mapping[str, Mapping[str, Any]], batch_size: int, *,
            steps: int = 3, **common) -> Comparison:
    """Measure memory and time of each configuration side by side at one batch size.

    Args:
        model: the model (copied for each configuration, never changed).
        data: as for :func:`measure`.
        configs: ``{label: {TrainConfig field: value}}``, e.g.
            ``{"fp32": {}, "checkpoint": {"checkpoint_segments": 2}, "accumulate 4": {"accumulate": 4}}``.
        batch_size: the (effective) batch size of every configuration.
        steps: timed steps per configuration.
        **common: ``TrainConfig`` fields shared by all.

    Returns:
        :class:`Comparison`; ``memory_ratio`` and ``time_ratio`` are relative to the first.

    Example:
        >>> import torch
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
        >>> c = compare(MLP(40, (64, 64), 10), (x, y), {"plain": {}, "accumulate 4": {"accumulate": 4}},
        ...             128, steps=0, device="cpu")
        >>> [r["config"] for r in c.rows], c.rows[1]["saved"] < c.rows[0]["saved"]
        (['plain', 'accumulate 4'], True)
    """
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("configs must be a non-empty mapping {label: {option: value}}")
    for label, opts in configs.items():
        if not isinstance(opts, Mapping):
            raise TypeError(f"configs[{label!r}] must be a mapping of TrainConfig options, got {type(opts).__name__}")
        _make_config(None, {**common, **opts}, batch_size)   # every configuration checked first
    rows = []
    for label, opts in configs.items():
        report = measure(model, data, [batch_size], steps=steps, label=label, **{**common, **opts})
        rows.append(report.rows[0])
    ref = rows[0]
    for r in rows:   # an out-of-memory configuration (total None) has no ratio, nor has any beside an OOM first
        r["memory_ratio"] = r["total"] / ref["total"] if r.get("total") and ref.get("total") else None
        if r.get("time_per_step") and ref.get("time_per_step"):
            r["time_ratio"] = r["time_per_step"] / ref["time_per_step"]
    return Comparison(rows)


# ====================================================================== the planner
@dataclass(frozen=True)
class Plan:
    """An effective-batch plan: per-device micro-batches, accumulation, learning rate, warm-up.

    ``target_batch = world_size * accumulate * micro_batch`` (the last micro-batch of a step may
    be smaller when the split is uneven). Apply it with ``Trainer.from_plan`` or ``to_config``.
    """

    target_batch: int
    world_size: int
    per_device_batch: int
    micro_batch: int
    accumulate: int
    max_micro_batch: int
    lr: float
    base_lr: float
    base_batch: int
    scale_rule: str
    warmup_epochs: float
    predicted_bytes: float | None
    budget: int | None

    def to_config(self, config=None, **options):
        """A ``TrainConfig`` (per device) that runs this plan; ``options`` override other fields."""
        k = self.lr / self.base_lr if self.base_lr > 0 else 1.0
        fields = dict(batch_size=self.per_device_batch, accumulate=self.accumulate, lr=self.lr,
                      scale_rule="none", base_batch_size=None)
        if self.warmup_epochs > 0:
            fields.update(warmup="linear", warmup_epochs=self.warmup_epochs, warmup_steps=None,
                          warmup_start=min(1.0, 1.0 / k) if k > 1 else None)
        fields.update(options)
        return TrainConfig(**fields) if config is None else config.replace(**fields)

    def summary(self) -> str:
        lines = [f"effective batch {self.target_batch} = {self.world_size} device(s) x {self.accumulate} "
                 f"micro-batch(es) of {self.micro_batch}"
                 + (f" (memory allows up to {self.max_micro_batch})" if self.budget is not None else ""),
                 f"lr {self.lr:.4g} ({self.scale_rule} scaling of {self.base_lr:.4g} at batch {self.base_batch})",
                 f"warm-up: {'linear over ' + format(self.warmup_epochs, 'g') + ' epochs' if self.warmup_epochs else 'none'}"]
        if self.predicted_bytes is not None:
            lines.append(f"predicted step memory {_mib(self.predicted_bytes):.2f} MiB of a "
                         f"{_mib(self.budget):.2f} MiB budget")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def plan(target_batch: int, budget=None, *, memory: MemoryModel | MemoryReport | None = None, world_size: int = 1,
         base_lr: float = 0.1, base_batch: int | None = None, rule: str = "linear",
         warmup_epochs: float | None = None, max_micro_batch: int | None = None, round_to=None) -> Plan:
    """Plan an effective batch: the micro-batch memory allows, accumulation steps, lr and warm-up.

    The micro-batch is the largest that fits ``budget`` by ``memory`` (a :class:`MemoryModel`)
    or ``max_micro_batch``; accumulation is the fewest micro-batches per device reaching the
    per-device batch. The lr follows ``rule`` (``"linear"``, Goyal et al. 2017; ``"sqrt"``,
    Hoffer et al. 2017; ``"none"``). Warm-up: when the lr grows by k > 1, a linear warm-up from
    the base lr over 5 epochs (Goyal et al.'s gradual warm-up), unless ``warmup_epochs`` is given.

    Args:
        target_batch: the effective batch (examples per optimizer step, all devices together).
        budget: bytes per device (needs ``memory``).
        memory: the fitted memory model (or the ``MemoryReport`` to fit it from).
        world_size: data-parallel devices (``target_batch`` must divide evenly among them).
        base_lr, base_batch: the lr tuned at batch ``base_batch`` (default ``target_batch``).
        rule: the lr scaling rule.
        warmup_epochs: override the warm-up suggestion.
        max_micro_batch: cap the micro-batch directly (with or without a budget).
        round_to: round the memory limit down to a multiple of 8 or a power of two.

    Example:
        >>> m = MemoryModel.fit([32, 64], [1_000_000 + 32 * 10_000, 1_000_000 + 64 * 10_000])
        >>> p = plan(1024, budget=2_000_000, memory=m, base_lr=0.1, base_batch=256)
        >>> p.micro_batch, p.accumulate, round(p.lr, 3), p.warmup_epochs
        (94, 11, 0.4, 5.0)
    """
    if not is_int(target_batch) or target_batch < 1:
        raise ValueError(f"target_batch must be a positive int, got {target_batch!r}")
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if target_batch % world_size:
        raise ValueError(f"target_batch={target_batch} does not divide among world_size={world_size} devices")
    if rule not in SCALE_RULES:
        raise ValueError(f"rule={rule!r} is not known; use one of {SCALE_RULES}")
    base_batch = target_batch if base_batch is None else base_batch
    if not is_int(base_batch) or base_batch < 1:
        raise ValueError(f"base_batch must be a positive int, got {base_batch!r}")
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
    if warmup_epochs is not None and (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float))
                                      or warmup_epochs < 0):
        raise ValueError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    if isinstance(memory, MemoryReport):
        memory = memory.fit()
    if memory is not None and not isinstance(memory, MemoryModel):
        raise TypeError(f"memory must be a MemoryModel or a MemoryReport, got {type(memory).__name__}")
    per_device = target_batch // world_size
    cap = per_device
    predicted = None
    if budget is not None:
        if memory is None:
            raise ValueError("budget: give memory=MemoryModel (from measure(...).fit()) to turn a budget into a batch")
        cap = min(cap, memory.max_batch_size(budget, round_to=round_to))
    elif memory is not None:
        raise ValueError("memory: give budget=... (bytes per device) with the memory model")
    if max_micro_batch is not None:
        if not is_int(max_micro_batch) or max_micro_batch < 1:
            raise ValueError(f"max_micro_batch must be a positive int, got {max_micro_batch!r}")
        cap = min(cap, max_micro_batch)
    accumulate = math.ceil(per_device / cap)
    micro = math.ceil(per_device / accumulate)
    if memory is not None:
        predicted = memory.predict(micro)
    lr = scale_lr(base_lr, target_batch, base_batch, rule)
    k = lr / base_lr if base_lr > 0 else 1.0
    warm = float(warmup_epochs) if warmup_epochs is not None else (5.0 if k > 1 else 0.0)
    return Plan(target_batch, world_size, per_device, micro, accumulate, cap, lr, float(base_lr), base_batch,
                rule, warm, predicted, None if budget is None else _check_budget(budget))
