"""The record of a run: one row per optimizer step and one per evaluation.

Columns are plain Python lists (cheap to append in the training loop, safe to save with
``torch.save`` and load with ``weights_only=True``). pandas is optional: ``to_pandas`` imports
it only when called.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
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

    @staticmethod
    def read(path: str | os.PathLike) -> "History":
        """The History of a run log (``Trainer(..., log_dir=...)``), every row up to its last flush.

        ``path`` is the log directory or its ``history.jsonl``. A last line cut short by a
        killed process is skipped; the target of ``fit(until=...)`` is not logged.
        """
        return _read_log(path)

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


LOG_FILE = "history.jsonl"
CONFIG_FILE = "config.json"


class RunLog:
    """An append-only record of a run on disk that outlives the process writing it.

    The History's new rows are appended to ``<log_dir>/history.jsonl`` as JSON lines (one
    ``{"steps": row}``, ``{"evals": row}`` or ``{"events": event}`` per line) and flushed to
    the operating system at most every ``every`` seconds, and whenever ``write(..., now=True)``
    is called (the Trainer does so at every evaluation and when a fit ends). The run's config
    goes to ``<log_dir>/config.json``. A process killed outright (a kernel over its memory
    limit) loses at most the rows since the last flush; :meth:`History.read` gets the rest back.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> h = History(); log = RunLog(d, {"lr": 0.1})
        >>> h.steps.append({"step": 1, "loss": 2.5}); log.write(h, now=True)
        >>> History.read(d).steps["loss"]
        [2.5]
    """

    def __init__(self, log_dir: str | os.PathLike, config: Mapping[str, Any] | None = None, *, every: float = 2.0):
        if not isinstance(every, (int, float)) or isinstance(every, bool) or not every > 0:
            raise ValueError(f"every must be a number of seconds > 0, got {every!r}")
        self.dir = os.fspath(log_dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
            if config is not None:
                with open(os.path.join(self.dir, CONFIG_FILE), "w") as f:
                    json.dump(dict(config), f, indent=1, default=repr)
            with open(os.path.join(self.dir, LOG_FILE), "a"):
                pass
        except OSError as err:
            raise ValueError(f"log_dir={self.dir!r}: cannot write the run log there ({err.strerror or err})") from err
        self.path = os.path.join(self.dir, LOG_FILE)
        self.every = float(every)
        self._written = {"steps": 0, "evals": 0, "events": 0}
        self._last = time.monotonic()
        # A log already there (a run resumed into its own log directory): this one starts over from
        # the History it is given (a resumed trainer's holds every row up to its checkpoint).
        self._restart = os.path.getsize(self.path) > 0

    def write(self, history: "History", now: bool = False) -> None:
        """Append the rows ``history`` gained since the last write (only every few seconds unless ``now``)."""
        if not now and time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        lines = []
        if self._restart:
            lines.append(json.dumps({"truncate": {"steps": 0, "evals": 0, "events": 0}}))
            self._restart = False
        sizes = {"steps": len(history.steps), "evals": len(history.evals), "events": len(history.events)}
        if any(sizes[k] < self._written[k] for k in sizes):
            # The History was replaced (a checkpoint loaded): the log continues from its rows.
            lines.append(json.dumps({"truncate": {k: min(sizes[k], self._written[k]) for k in sizes}}))
            self._written = {k: min(sizes[k], self._written[k]) for k in sizes}
        for kind in ("steps", "evals"):
            table = history.steps if kind == "steps" else history.evals
            for i in range(self._written[kind], sizes[kind]):
                lines.append(json.dumps({kind: table.row(i)}))
        for event in history.events[self._written["events"]:]:
            lines.append(json.dumps({"events": event}))
        if lines:
            with open(self.path, "a") as f:
                f.write("\n".join(lines) + "\n")
        self._written = sizes


def _read_log(path: str | os.PathLike) -> "History":
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LOG_FILE)
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError as err:
        raise ValueError(f"{path!r}: cannot read the run log ({err.strerror or err})") from err
    history = History()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == last:   # the write the process was killed in: the rows before it are complete
                break
            raise ValueError(f"{path!r}: line {i + 1} is not a run-log record") from None
        if not isinstance(record, dict) or len(record) != 1:
            raise ValueError(f"{path!r}: line {i + 1} is not a run-log record")
        (kind, value), = record.items()
        if kind == "steps":
            history.steps.append(value)
        elif kind == "evals":
            history.evals.append(value)
        elif kind == "events":
            history.events.append(dict(value))
        elif kind == "truncate":
            history.steps.truncate(value["steps"])
            history.evals.truncate(value["evals"])
            del history.events[value["events"]:]
        else:
            raise ValueError(f"{path!r}: line {i + 1} holds an unknown record {kind!r}")
    return history

