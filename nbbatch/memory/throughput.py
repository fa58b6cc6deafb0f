"""Where growing the batch stops nearly scaling throughput: the knee of examples per second.

:func:`find_knee` walks measured points; :func:`fit_step_time` fits
``time(B) = overhead + per_example * B`` and derives the knee of that line.
"""

from __future__ import annotations

import math
from typing import Sequence

from .model import MemoryModel, check_batch_sizes

__all__ = ["check_min_gain", "find_knee", "fit_step_time"]


def check_min_gain(min_gain) -> float:
    """A throughput factor in (1, 2] that a doubling must give to count as scaling."""
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 1 < min_gain <= 2:
        raise ValueError(f"min_gain must lie in (1, 2], got {min_gain!r}")
    return min_gain


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
    sizes = check_batch_sizes(batch_sizes)
    if list(batch_sizes) != sizes:
        raise ValueError(f"batch_sizes must be increasing and distinct, got {list(batch_sizes)!r}")
    if len(examples_per_s) != len(sizes):
        raise ValueError(f"examples_per_s has {len(examples_per_s)} values for {len(sizes)} batch sizes")
    if not all(isinstance(v, (int, float)) and v > 0 for v in examples_per_s):
        raise ValueError("examples_per_s must be positive numbers")
    check_min_gain(min_gain)
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
    check_min_gain(min_gain)
    line = MemoryModel.fit(list(batch_sizes), list(time_per_step))
    t0, c = line.fixed, line.per_example
    knee = (2 - min_gain) * t0 / ((2 * min_gain - 2) * c) if c > 0 else float("inf")
    return {"overhead": t0, "per_example": c, "knee": knee}
