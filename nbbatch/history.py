"""The record of a run: one row per optimizer step and one per evaluation.

Columns are plain Python lists (cheap to append in the training loop, safe to save with
``torch.save`` and load with ``weights_only=True``). pandas is optional: ``to_pandas`` imports
it only when called.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Mapping

STEP_COLUMNS = ("step", "epoch", "examples", "loss", "lr", "batch_size", "time", "examples_per_s", "peak_memory")
EVAL_COLUMNS = ("step", "epoch", "examples", "time")


class Table:
    """Columns of equal length; a missing value in a row is stored as None."""

    def __init__(self, columns: Iterable[str] = ()):
        self._cols: dict[str, list] = {c: [] for c in columns}
        self._n = 0

    def append(self, row: Mapping[str, Any]) -> None:
        cols = self._cols
        if row.keys() == cols.keys():          # the common case, once per training step
            for name, col in cols.items():
                col.append(row[name])
        else:
            for name in row.keys() - cols.keys():
                cols[name] = [None] * self._n
            for name, col in cols.items():
                col.append(row.get(name))
        self._n += 1

    def __len__(self) -> int:
        return self._n

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def __getitem__(self, name: str) -> list:
        if name not in self._cols:
            raise KeyError(f"no column {name!r}; columns: {self.columns}")
        return list(self._cols[name])

    def __contains__(self, name: str) -> bool:
        return name in self._cols

    def row(self, i: int) -> dict:
        return {name: col[i] for name, col in self._cols.items()}

    def rows(self) -> list[dict]:
        return [self.row(i) for i in range(self._n)]

    def last(self) -> dict | None:
        return self.row(self._n - 1) if self._n else None

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows."""
        for col in self._cols.values():
            del col[n:]
        self._n = min(self._n, n)

    def state_dict(self) -> dict:
        return {name: list(col) for name, col in self._cols.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, list]) -> "Table":
        table = cls()
        lengths = {len(v) for v in state.values()}
        if len(lengths) > 1:
            raise ValueError(f"history columns have different lengths {sorted(lengths)}")
        table._cols = {name: list(col) for name, col in state.items()}
        table._n = lengths.pop() if lengths else 0
        return table


class History:
    """What a run did, step by step and evaluation by evaluation.

    ``history.steps`` has one row per optimizer step (step, epoch, examples, loss, lr,
    batch_size, time, examples_per_s, peak_memory); ``history.evals`` one row per evaluation
    (step, epoch, examples, time and ``eval_<metric>`` columns such as ``eval_loss``).

    Example:
        >>> h = History()
        >>> h.steps.append({"step": 1, "loss": 2.3}); h.steps["loss"]
        [2.3]
    """

    def __init__(self):
        self.steps = Table(STEP_COLUMNS)
        self.evals = Table(EVAL_COLUMNS)
        self.events: list[dict] = []   # stops, interrupts, divergence: {"step": .., "event": .., "detail": ..}
        self.target: dict | None = None  # the last fit's until= target and whether it was reached

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        last = self.evals.last()
        tail = ""
        if last:
            tail = ", last eval " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()
                                              if k.startswith("eval_") and isinstance(v, float))
        return f"History({len(self.steps)} steps, {len(self.evals)} evals{tail})"

    def _table(self, kind: str) -> Table:
        if kind not in ("steps", "evals"):
            raise ValueError(f"kind must be 'steps' or 'evals', got {kind!r}")
        return self.steps if kind == "steps" else self.evals

    def to_pandas(self, kind: str = "steps"):
        """The steps (or ``kind="evals"``) table as a pandas DataFrame (needs pandas)."""
        table = self._table(kind)
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("History.to_pandas needs pandas: pip install pandas") from err
        return pd.DataFrame({name: table[name] for name in table.columns})

    def to_csv(self, path: str | os.PathLike, kind: str = "steps") -> None:
        """Write the steps (or ``kind="evals"``) table as CSV; None becomes an empty cell."""
        table = self._table(kind)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(table.columns)
            for row in zip(*(table[c] for c in table.columns)):
                writer.writerow(["" if v is None else v for v in row])

    def state_dict(self) -> dict:
        return {"steps": self.steps.state_dict(), "evals": self.evals.state_dict(),
                "events": [dict(e) for e in self.events], "target": dict(self.target) if self.target else None}

    def load_state_dict(self, state: Mapping) -> None:
        self.steps = Table.from_state_dict(state["steps"])
        self.evals = Table.from_state_dict(state["evals"])
        self.events = [dict(e) for e in state.get("events", [])]
        self.target = dict(state["target"]) if state.get("target") else None

    def plot(self, x: str = "step", *, smooth: int = 0, figsize=(11, 3.4)):
        """A matplotlib Figure: training and evaluation loss, evaluation metrics, learning rate.

        Args:
            x: ``"step"``, ``"examples"``, ``"epoch"`` or ``"time"`` for the horizontal axis.
            smooth: window of a running mean over the step losses (0: none).

        Drawn with ``matplotlib.figure.Figure`` (no pyplot state), so it is safe off the main
        thread; in a notebook the returned figure displays itself.
        """
        from matplotlib.figure import Figure

        if x not in ("step", "examples", "epoch", "time"):
            raise ValueError(f"x must be 'step', 'examples', 'epoch' or 'time', got {x!r}")
        fig = Figure(figsize=figsize, layout="constrained")
        ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
        xs, losses = self.steps[x], self.steps["loss"]
        if smooth and smooth > 1:
            losses = running_mean(losses, smooth)
        ax_loss.plot(xs, losses, lw=1, label="train (per step)")
        ev_x = self.evals[x]
        if "eval_loss" in self.evals:
            ax_loss.plot(ev_x, self.evals["eval_loss"], "o-", ms=3, label="eval")
        ax_loss.set(xlabel=x, ylabel="loss", yscale="log" if _positive(losses) else "linear", title="loss")
        ax_loss.legend(fontsize=8)
        metric_cols = [c for c in self.evals.columns if c.startswith("eval_") and c != "eval_loss"]
        for name in metric_cols:
            ax_metric.plot(ev_x, self.evals[name], "o-", ms=3, label=name[5:])
        ax_metric.set(xlabel=x, title="eval metrics")
        if metric_cols:
            ax_metric.legend(fontsize=8)
        ax_lr.plot(xs, self.steps["lr"], lw=1)
        ax_lr.set(xlabel=x, ylabel="learning rate", title="learning rate")
        return fig


def running_mean(values: list, window: int) -> list:
    """Trailing running mean (the first values average what is there so far).

    Example:
        >>> running_mean([1.0, 3.0, 5.0, 7.0], 2)
        [1.0, 2.0, 4.0, 6.0]
    """
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _positive(values: list) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) and v > 0 for v in values)
