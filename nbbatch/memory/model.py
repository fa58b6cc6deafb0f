"""Training-step memory as a line in the batch size, and the checks of budgets and batch sizes.

:class:`MemoryModel` fits ``fixed + per_example * B`` to measured points; ``max_batch_size``
answers "what fits in this budget". The checks here are shared by the measurement, the finder
and the planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..checks import check_sizes, is_int

__all__ = ["MemoryModel", "ROUNDINGS", "check_batch_sizes", "check_budget", "check_round_to", "mib", "round_down"]

ROUNDINGS = (None, 8, "pow2")


def check_batch_sizes(batch_sizes) -> list[int]:
    """The distinct batch sizes in increasing order; a clear error for anything but positive ints.

    Example:
        >>> check_batch_sizes([64, 32, 64])
        [32, 64]
    """
    return sorted(set(check_sizes("batch_sizes", batch_sizes)))


def check_budget(budget) -> int:
    """A positive, finite number of bytes, as an int."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
    return int(budget)


def check_round_to(round_to):
    """One of :data:`ROUNDINGS`: None, ``8`` or ``"pow2"``."""
    if round_to not in ROUNDINGS:
        raise ValueError(f"round_to must be None, 8 or 'pow2', got {round_to!r}")
    return round_to


def round_down(b: int, round_to) -> int:
    """``b`` rounded down to a multiple of 8 or a power of two (``round_to=None``: ``b``).

    Example:
        >>> round_down(100, 8), round_down(100, "pow2"), round_down(100, None)
        (96, 64, 100)
    """
    if round_to == 8:
        return (b // 8) * 8
    if round_to == "pow2":
        return 1 << (b.bit_length() - 1) if b >= 1 else 0
    return b


def mib(n: float) -> float:
    """Bytes in MiB."""
    return n / 2**20


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
        if not is_int(runs) or runs < 1:
            raise ValueError(f"runs must be a positive int, got {runs!r}")
        return runs * self.predict(batch_size)

    def max_runs(self, budget, batch_size) -> int:
        """The most runs at ``batch_size`` that fit in ``budget`` bytes trained as one MultiRun (0: none)."""
        budget = check_budget(budget)
        return int(math.floor(budget / self.predict(batch_size) + 1e-9))

    def max_batch_size(self, budget, round_to=None) -> int:
        """The largest batch size whose predicted memory fits in ``budget`` bytes.

        Raises:
            ValueError: when the budget is below the fixed cost (the model alone does not fit),
                or not even one example fits.
        """
        budget = check_budget(budget)
        check_round_to(round_to)
        if budget < self.fixed:
            raise ValueError(f"budget={budget} bytes ({mib(budget):.2f} MiB) is below the fixed cost "
                             f"{self.fixed:.0f} bytes ({mib(self.fixed):.2f} MiB): the model alone (parameters, "
                             f"gradients, optimizer state) does not fit")
        if self.per_example <= 0:
            raise ValueError("the fitted per-example cost is not positive: memory does not grow with the batch "
                             "in these measurements, so no largest batch follows from them")
        b = int(math.floor((budget - self.fixed) / self.per_example + 1e-9))
        b = round_down(b, round_to)
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
        ax.plot(self.batch_sizes, [mib(t) for t in self.measured], "ko", label="measured")
        ax.plot(xs, [mib(self.predict(b)) for b in xs], "k--", lw=1,
                label=f"fit: {mib(self.fixed):.2f} MiB + {self.per_example / 1024:.2f} KiB x B")
        if budget is not None:
            ax.axhline(mib(budget), color="C3", lw=1, label=f"budget {mib(budget):.1f} MiB")
            ax.axvline(limit, color="C3", ls=":", lw=1, label=f"predicted limit B={limit}")
        ax.set(xlabel="batch size", ylabel="MiB")
        ax.legend(fontsize=8)
        return ax
