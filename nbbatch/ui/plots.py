"""Live training figures drawn with ``matplotlib.figure.Figure`` + Agg, safe off the main thread.

pyplot is never used: its global state is not thread-safe and its figures would leak into the
notebook. A ``LiveFigure`` keeps one Figure and its line artists and only updates their data,
so a redraw costs one Agg render. ``Refresher`` redraws at most every ``interval`` seconds and
never spends more than about ``budget`` (5%) of the wall time on drawing (updates are coalesced:
whatever happened since the last frame is drawn once).
"""

from __future__ import annotations

import io
import threading
import time
from typing import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_POINTS = 1500            # longer series are thinned (every k-th point, the last one kept)
NOISE_COLUMNS = ("noise_scale", "b_simple", "B_simple")
PANELS = (("step", "loss", "loss vs step"), ("examples", "loss", "loss vs examples"),
          ("time", "loss", "loss vs wall time (s)"), ("step", "metric", "eval metric vs step"),
          ("step", "lr", "learning rate"), ("step", "examples_per_s", "examples/s"))


def snapshot(history) -> dict:
    """Copies of a History's columns cut to a common length (safe while another thread appends)."""
    out = {}
    for kind, table in (("steps", history.steps), ("evals", history.evals)):
        cols = {name: table[name] for name in table.columns}
        n = min((len(c) for c in cols.values()), default=0)
        out[kind] = {name: c[:n] for name, c in cols.items()}
    return out


def _thin(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) > MAX_POINTS:
        k = -(-len(pairs) // MAX_POINTS)
        pairs = pairs[::k] + ([pairs[-1]] if (len(pairs) - 1) % k else [])
    return [p[0] for p in pairs], [p[1] for p in pairs]


class LiveFigure:
    """A 2x3 figure of one or several runs: loss vs step / examples / wall time, eval metric,
    lr and examples/s (peak memory and the noise scale in titles and on a twin axis when recorded).

    Args:
        labels: one label per run (the legend).
        metric: the eval column to plot (default: the first ``eval_*`` column other than the loss).
        dpi, figsize: the PNG's resolution and size in inches.

    Example:
        >>> from nbbatch import History
        >>> h = History(); h.steps.append({"step": 1, "examples": 8, "time": 0.1, "loss": 2.0, "lr": 0.1})
        >>> fig = LiveFigure(["B=8"]); png = fig.png([h]); png[:4]
        b'\\x89PNG'
    """

    def __init__(self, labels: Sequence[str], metric: str | None = None, dpi: int = 72,
                 figsize: tuple[float, float] = (11.0, 5.6)):
        if not labels:
            raise ValueError("labels: give at least one run label")
        self.labels = [str(x) for x in labels]
        self.metric = metric
        self.figure = Figure(figsize=figsize, dpi=dpi)
        # fixed margins: a layout engine would re-measure every text on each frame
        self.figure.subplots_adjust(left=0.06, right=0.94, bottom=0.07, top=0.94, wspace=0.28, hspace=0.32)
        self.canvas = FigureCanvasAgg(self.figure)
        axes = self.figure.subplots(2, 3)
        self.axes = {title: ax for (_, _, title), ax in zip(PANELS, axes.flat)}
        colors = [f"C{i % 10}" for i in range(len(self.labels))]
        self._lines = {}
        for (x, y, title), ax in zip(PANELS, axes.flat):
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            for i, label in enumerate(self.labels):
                style = dict(color=colors[i], lw=1.0, label=label)
                self._lines[(title, i)] = ax.plot([], [], **style)[0]
                if y == "loss" or y == "metric":   # evaluations as markers on the same axes
                    self._lines[(title, i, "eval")] = ax.plot([], [], "o", ms=3, color=colors[i])[0]
            if y == "loss":
                ax.set_yscale("log")
        self._noise_ax = None
        if len(self.labels) > 1:
            self.axes["loss vs step"].legend(fontsize=7, loc="upper right")
        self.renders = 0
        self.render_seconds = 0.0

    def _metric_name(self, snaps) -> str | None:
        if self.metric is not None:
            return self.metric if self.metric.startswith("eval_") else "eval_" + self.metric
        for s in snaps:
            for name in s["evals"]:
                if name.startswith("eval_") and name != "eval_loss":
                    return name
        return None

    def update(self, histories: Sequence) -> None:
        """Set the lines' data from ``histories`` (History objects or ``snapshot`` dicts)."""
        snaps = [h if isinstance(h, dict) else snapshot(h) for h in histories]
        if len(snaps) != len(self.labels):
            raise ValueError(f"histories: {len(snaps)} runs for {len(self.labels)} labels")
        metric = self._metric_name(snaps)
        self.axes["eval metric vs step"].set_title(metric or "eval metric vs step", fontsize=9)
        peaks, noise = [], []
        # A log axis cannot show a loss <= 0 (a custom loss may have one): such runs get a linear axis.
        losses = (v for s in snaps for v in (*s["steps"].get("loss", []), *s["evals"].get("eval_loss", [])))
        scale = "log" if all(v > 0 for v in losses) else "linear"
        for x, y, title in PANELS:
            if y == "loss" and self.axes[title].get_yscale() != scale:
                self.axes[title].set_yscale(scale)
        for i, s in enumerate(snaps):
            st, ev = s["steps"], s["evals"]
            for x, y, title in PANELS:
                line = self._lines[(title, i)]
                if y == "metric":
                    xs, ys = _thin(ev.get(x, []), ev.get(metric, [])) if metric else ([], [])
                    line.set_data(xs, ys)
                    continue
                line.set_data(*_thin(st.get(x, []), st.get(y, [])))
                if y == "loss":
                    self._lines[(title, i, "eval")].set_data(*_thin(ev.get(x, []), ev.get("eval_loss", [])))
            mem = [m for m in st.get("peak_memory", []) if m is not None]
            if mem:
                peaks.append(max(mem))
            for name in NOISE_COLUMNS:
                if name in st and any(v is not None for v in st[name]):
                    noise.append((i, st.get("step", []), st[name]))
                    break
        ax_speed = self.axes["examples/s"]
        ax_speed.set_title("examples/s" + (f"  (peak memory {max(peaks) / 2**20:.0f} MiB)" if peaks else ""), fontsize=9)
        if noise:
            if self._noise_ax is None:
                self._noise_ax = self.axes["learning rate"].twinx()
                self._noise_ax.set_ylabel("noise scale B_simple", fontsize=7)
                self._noise_ax.tick_params(labelsize=7)
            for i, xs, ys in noise:
                key = ("noise", i)
                if key not in self._lines:
                    self._lines[key] = self._noise_ax.plot([], [], ":", color=f"C{i % 10}")[0]
                self._lines[key].set_data(*_thin(xs, ys))
        for ax in list(self.axes.values()) + ([self._noise_ax] if self._noise_ax is not None else []):
            ax.relim()
            ax.autoscale_view()

    def png(self, histories: Sequence | None = None) -> bytes:
        """Render (after ``update(histories)`` when given) and return PNG bytes."""
        t0 = time.perf_counter()
        if histories is not None:
            self.update(histories)
        buf = io.BytesIO()
        self.canvas.print_png(buf)
        self.renders += 1
        self.render_seconds += time.perf_counter() - t0
        return buf.getvalue()


class Refresher:
    """Redraw from a daemon thread while training: ``tick()`` every ``interval`` s, ``draw()`` throttled.

    ``tick`` is for cheap updates (status line, progress bar). ``draw`` (the figure) runs at
    most every ``interval`` s and at least ``cost / budget`` s after the previous one, where
    ``cost`` is the time that frame took: with ``budget=0.05`` drawing takes at most about 5% of
    the wall time however slow a frame is. Whatever happened in between is drawn once
    (coalesced). ``final()`` stops the thread and draws the last frame (the static one).

    Example:
        >>> frames = []
        >>> r = Refresher(lambda: frames.append(1), interval=0.01)
        >>> r.start(); r.final(); r.final_frames, len(frames) >= 1
        (1, True)
    """

    def __init__(self, draw: Callable[[], None], interval: float = 1.0, budget: float = 0.05,
                 tick: Callable[[], None] | None = None):
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(f"refresh interval must be a number > 0 seconds, got {interval!r}")
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise ValueError(f"budget must lie in (0, 1], got {budget!r}")
        self.draw, self.tick, self.interval, self.budget = draw, tick, float(interval), float(budget)
        self._wake = threading.Event()
        self._quit = False
        self._thread: threading.Thread | None = None
        self.frames = 0
        self.final_frames = 0
        self.cost = 0.0          # seconds the last frame took (kept across runs; may be preset)
        self.errors: list[BaseException] = []
        # final() may come from two threads at once (the run's end, and start() of a run that
        # ended at once): their frames must not render the same Figure together
        self._final_lock = threading.Lock()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._quit = False
        self._thread = threading.Thread(target=self._loop, name="nbbatch-refresh", daemon=True)
        self._thread.start()

    def _call(self, fn) -> float:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as err:   # kept, never raised into the training
            self.errors.append(err)
            return time.perf_counter() - t0
        if fn is self.draw:
            self.frames += 1
        return time.perf_counter() - t0

    def _loop(self) -> None:
        last = time.perf_counter()
        while not self._quit:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._quit:
                break
            if self.tick is not None:
                self._call(self.tick)
            if time.perf_counter() - last >= max(self.interval, self.cost / self.budget):
                self.cost = self._call(self.draw)
                last = time.perf_counter()

    def stop(self) -> None:
        self._quit = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def final(self) -> None:
        """Stop the thread and draw the last frame."""
        with self._final_lock:
            self.stop()
            self.cost = self._call(self.draw)
            self.final_frames += 1
