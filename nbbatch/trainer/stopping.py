"""How a fit stops early: a ``Target`` reached on a recorded metric, or a ``DivergenceError``."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; the model was left at its last good step."""

    def __init__(self, message: str, *, step: int, lr: float, loss: float):
        super().__init__(message)
        self.step, self.lr, self.loss = step, lr, loss


@dataclasses.dataclass(frozen=True)
class Target:
    """A stopping target on a recorded metric: ``metric`` reaching ``value`` (``mode`` min or max)."""

    metric: str
    value: float
    mode: str

    def reached(self, current: float) -> bool:
        return current <= self.value if self.mode == "min" else current >= self.value

    @classmethod
    def parse(cls, until) -> "Target":
        """From ``("eval_accuracy", 0.9)``, ``{"eval_loss": 0.3}``, ``"eval_accuracy>=0.9"`` or a Target.

        Metrics whose name ends in ``loss`` are minimised, all others maximised, unless the
        string form gives the direction with ``<=`` or ``>=``.
        """
        if isinstance(until, Target):
            return until
        mode = None
        if isinstance(until, str):
            for op, m in (("<=", "min"), (">=", "max")):
                if op in until:
                    name, _, value = until.partition(op)
                    mode = m
                    break
            else:
                raise ValueError(f"until={until!r}: write it as 'metric<=value' or 'metric>=value'")
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"until={until!r}: {value.strip()!r} is not a number") from None
            name = name.strip()
        elif isinstance(until, Mapping) and len(until) == 1:
            (name, value), = until.items()
        elif isinstance(until, (tuple, list)) and len(until) == 2:
            name, value = until
        else:
            raise ValueError(f"until={until!r}: give (metric, value), {{metric: value}} or 'metric>=value'")
        if not isinstance(name, str) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"until={until!r}: the metric must be a name and the value a finite number")
        if mode is None:
            mode = "min" if name.endswith("loss") else "max"
        return cls(name, float(value), mode)
