"""Memory and time of several training configurations side by side: :func:`compare_configs`.

(Races of whole training runs are ``nbbatch.ui.compare``; this compares one step's cost.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn as nn

from .measurement import measure
from .model import mib
from .trials import make_config

__all__ = ["ConfigComparison", "compare_configs"]


@dataclass
class ConfigComparison:
    """Memory and time of several configurations at one batch size (from :func:`compare_configs`)."""

    rows: list[dict]

    def to_pandas(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def __repr__(self) -> str:
        lines = ["ConfigComparison"]
        for r in self.rows:
            if r.get("oom"):
                lines.append(f"  {r['config']:>16}: OOM")
                continue
            t = f", {1e3 * r['time_per_step']:.2f} ms/step ({r['time_ratio']:.2f}x)" if r.get("time_ratio") else ""
            ratio = f" ({r['memory_ratio']:.2f}x)" if r.get("memory_ratio") is not None else ""
            lines.append(f"  {r['config']:>16}: {mib(r['total']):8.3f} MiB{ratio}{t}")
        return "\n".join(lines)

    def plot(self, axes=None):
        import matplotlib.pyplot as plt
        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        names = [r["config"] for r in self.rows]
        axes[0].barh(names, [mib(r["total"] or 0) for r in self.rows])   # an out-of-memory row: no bar
        axes[0].set(xlabel="MiB", title="step memory")
        if all(r.get("time_per_step") for r in self.rows):
            axes[1].barh(names, [1e3 * r["time_per_step"] for r in self.rows], color="C1")
            axes[1].set(xlabel="ms / step", title="time per step")
        return axes


def compare_configs(model: nn.Module, data, configs: Mapping[str, Mapping[str, Any]], batch_size: int, *,
                    steps: int = 3, **common) -> ConfigComparison:
    """Measure memory and time of each configuration side by side at one batch size.

    Args:
        model: the model (copied for each configuration, never changed).
        data: as for :func:`~nbbatch.memory.measure`.
        configs: ``{label: {TrainConfig field: value}}``, e.g.
            ``{"fp32": {}, "checkpoint": {"checkpoint_segments": 2}, "accumulate 4": {"accumulate": 4}}``.
        batch_size: the (effective) batch size of every configuration.
        steps: timed steps per configuration.
        **common: ``TrainConfig`` fields shared by all.

    Returns:
        :class:`ConfigComparison`; ``memory_ratio`` and ``time_ratio`` are relative to the first.

    Example:
        >>> import torch
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
        >>> c = compare_configs(MLP(40, (64, 64), 10), (x, y), {"plain": {}, "accumulate 4": {"accumulate": 4}},
        ...                     128, steps=0, device="cpu")
        >>> [r["config"] for r in c.rows], c.rows[1]["saved"] < c.rows[0]["saved"]
        (['plain', 'accumulate 4'], True)
    """
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("configs must be a non-empty mapping {label: {option: value}}")
    for label, opts in configs.items():
        if not isinstance(opts, Mapping):
            raise TypeError(f"configs[{label!r}] must be a mapping of TrainConfig options, got {type(opts).__name__}")
        make_config(None, {**common, **opts}, batch_size)   # every configuration checked first
    rows = []
    for label, opts in configs.items():
        report = measure(model, data, [batch_size], steps=steps, label=label, **{**common, **opts})
        rows.append(report.rows[0])
    ref = rows[0]
    for r in rows:   # an out-of-memory configuration (total None) has no ratio, nor has any beside an OOM first
        r["memory_ratio"] = r["total"] / ref["total"] if r.get("total") and ref.get("total") else None
        if r.get("time_per_step") and ref.get("time_per_step"):
            r["time_ratio"] = r["time_per_step"] / ref["time_per_step"]
    return ConfigComparison(rows)
