"""Memory and speed of real training steps at several batch sizes: :func:`measure`, :class:`MemoryReport`.

Each batch size runs real Trainer steps on a copy of the model. On CUDA the peak comes from the
caching allocator (``max_memory_allocated`` after a reset); on the CPU, which keeps no allocator
statistics, from exact accounting (:func:`~nbbatch.memory.accounting.account_step`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..checks import is_int
from ..device import describe_device, process_peak_rss_bytes, resolve_device, resolve_precision
from . import trials   # called through the module: a test can stand in for a trial in one place
from .model import MemoryModel, check_batch_sizes, mib
from .throughput import find_knee, fit_step_time

__all__ = ["PARTS", "MemoryReport", "measure"]

PARTS = ("params", "grads", "optimizer", "activations")


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
            mem = "OOM" if r.get("oom") else f"{mib(r['total']):9.3f} MiB"
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
                vals = [mib(r[part]) for r in self.rows if not r.get("oom")]
                if any(vals):
                    top = [a + b for a, b in zip(bottom, vals)]
                    ax.fill_between(bs, bottom, top, alpha=0.5, label=part, step=None)
                    bottom = top
        if len(set(bs)) >= 2:
            self.fit().plot(ax=ax, budget=budget)
        else:
            ax.plot(bs, [mib(r["total"]) for r in self.rows if not r.get("oom")], "ko", label="measured")
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
        label: a name for the configuration (shown by ``compare_configs``).
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
    sizes = check_batch_sizes(batch_sizes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    x, y = trials.sample_of(data)
    configs = [trials.make_config(config, options, b) for b in sizes]   # every config checked before running any
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
                row = trials.run_trial(work, x, y, cfg, steps=2 if device.type == "cuda" else 1, timed=steps)
            except BaseException as err:   # noqa: B902 - only out-of-memory is handled, the rest re-raised
                if not trials.is_oom(err):
                    raise
                trials.release_after_oom(err, device)
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
