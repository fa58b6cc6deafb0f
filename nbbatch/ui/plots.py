"""Live training figures drawn with ``matplotlib.figure.Figure`` + Agg, safe off the main thread.

pyplot is never used: its global state is not thread-safe and its figures would leak into the
notebook. A ``LiveFigure`` builds one Figure with all its artists once and afterwards only sets
their data (``Line2D.set_data``), with every line cut down to what the axes' pixels can show
(a min/max envelope per pixel column), so one frame costs about the same at 1k and at 100k
steps. ``Refresher`` draws the first frame soon after a run starts, then about once per
``interval`` and at least every ``max_gap`` seconds, keeping drawing near ``budget`` of the
wall time (updates are coalesced: whatever happened since the last frame is drawn once).

Measured against the alternatives (``bench/RESULTS.md``): ipympl renders with Agg in the kernel
too, the whole figure per update (about 58 ms of CPU a frame); a browser-side widget (bqplot,
plotly) costs the kernel under 1 ms but adds a front-end extension to every install. Here a
frame over the kept background costs about 11 ms, a full render (limits changed) about 50 ms.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import time
import zlib
from typing import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

NOISE_COLUMNS = ("noise_scale", "b_simple", "B_simple")
X_AXES = {"step": "optimizer step", "examples": "examples seen", "time": "training time (s)"}
# (y column, title) of the 2x2 panels; "metric" is the evaluation's metric (test accuracy)
PANELS = (("loss", "loss"), ("metric", "test metric"), ("lr", "learning rate"), ("examples_per_s", "examples/s"))
SMOOTH_FRACTION = 0.02       # the smoothed loss averages over ~2% of the run (at least 5 steps)
SHORT_RUN_S = 20.0           # a run expected to end within this many seconds shows its whole x range at once
LABEL_X, LABEL_Y = -0.13, -0.12   # axis label positions in axes fractions (below, left of the ticks)


def snapshot(history) -> dict:
    """Copies of a History's columns cut to a common length (safe while another thread appends)."""
    out = {}
    for kind, table in (("steps", history.steps), ("evals", history.evals)):
        cols = {name: table[name] for name in table.columns}
        n = min((len(c) for c in cols.values()), default=0)
        out[kind] = {name: c[:n] for name, c in cols.items()}
    return out


def compact(value: float, _pos=None) -> str:
    """A short tick label: 50000 -> '50k', 1500000 -> '1.5M', 0.05 -> '0.05'.

    Example:
        >>> [compact(v) for v in (0, 500, 50_000, 1_500_000, 0.05, 2.5e-4)]
        ['0', '500', '50k', '1.5M', '0.05', '0.00025']
    """
    a = abs(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if a >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}" if a >= 1e-3 or a == 0 else f"{value:.2g}"


def _floats(values) -> np.ndarray:
    try:
        return np.asarray(values, dtype=float)      # the common case: no None (a C loop)
    except TypeError:
        return np.array([np.nan if v is None else v for v in values], dtype=float)


def _xy(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of the pairs where both values are present and finite."""
    x, y = _floats(xs), _floats(ys)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def envelope(x: np.ndarray, y: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * columns`` points that draw like ``(x, y)`` on an axis ``columns`` pixels wide.

    The points are split into ``columns`` consecutive buckets; each keeps its minimum and its
    maximum (in x order), and the first and last points stay, so the band of a noisy per-step
    loss looks the same as with every point and the line still ends at the latest step.

    Example:
        >>> x = np.arange(10_000.0); y = np.sin(x)
        >>> ex, ey = envelope(x, y, 100); len(ex) <= 202, float(ey.max()) == float(y.max())
        (True, True)
    """
    n = len(x)
    if n <= 2 * columns:
        return x, y
    k = -(-n // columns)                      # points per bucket
    m = -(-n // k)                            # buckets (<= columns)
    pad = np.concatenate([y, np.full(m * k - n, y[-1])]).reshape(m, k)   # the tail repeats the last point
    base = np.arange(m) * k
    a = np.minimum(base + pad.argmin(axis=1), n - 1)
    b = np.minimum(base + pad.argmax(axis=1), n - 1)
    # each bucket's min and max, plus the first and last point (the line spans the run), in x order
    order = np.unique(np.concatenate([[0, n - 1], a, b]))
    return x[order], y[order]


def _nice(lo: float, hi: float, log: bool) -> tuple[float, float]:
    """Round limits outwards to round values (1-2-5 per decade on a log axis, tick steps on a
    linear one), so that small changes of the data leave them, and the frame's background, as they are.

    Example:
        >>> _nice(0.37, 2.4, log=True)
        (0.2, 5.0)
    """
    if log:
        def down(v):
            e = math.floor(math.log10(v))
            return max(m * 10.0 ** e for m in (1, 2, 5) if m * 10.0 ** e <= v * (1 + 1e-12))

        def up(v):
            e = math.floor(math.log10(v))
            return min(m * 10.0 ** e for m in (1, 2, 5, 10) if m * 10.0 ** e >= v * (1 - 1e-12))
        return down(lo), up(hi)
    ticks = MaxNLocator(5).tick_values(lo, hi)
    return float(min(ticks[0], lo)), float(max(ticks[-1], hi))


def x_limits(x0: float, x1: float, end: float | None, whole: bool = False) -> tuple[float, float]:
    """The x limits for data from ``x0`` to ``x1`` of a run planned to end at ``end``.

    The right limit is ``end / 4**k`` for the largest ``k`` that still shows the data, so the
    axis changes about ``log4(end / x1)`` times in a run (``whole``: ``end`` at once, for a run
    that ends in seconds anyway); without an end (or past it) it is the next round value above
    twice the data.

    Example:
        >>> x_limits(0, 30, 1000), x_limits(0, 300, 1000), x_limits(0, 30, None)
        ((0.0, 62.5), (0.0, 1000.0), (0.0, 60.0))
    """
    start = float(min(x0, 0.0))                # steps, examples and seconds start at 0
    if end is not None and 0 < x1 <= end:
        k = 0 if whole else max(0, math.floor(math.log(end / x1, 4) + 1e-9))
        return start, float(end / 4.0 ** k)
    return _nice(start, start + 2.0 * max(x1 - start, 1e-12), log=False)


def smooth(y: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average of ``y`` over about ``span`` points.

    Computed in numpy by blocks (``scipy.signal.lfilter`` would do it in one call, but importing
    scipy.signal costs a kernel about 40 MiB): within a block of ``k`` points the average is
    ``d**t * (carry + cumsum(alpha * y_s * d**-s))`` with ``d = 1 - alpha``, and ``k`` keeps
    ``d**-k`` under ``e**8`` so the rescaling loses no precision worth drawing.

    Example:
        >>> smooth(np.array([1.0, 1.0, 1.0]), 10).round(12).tolist()
        [1.0, 1.0, 1.0]
        >>> smooth(np.array([0.0, 3.0]), 2).round(6).tolist()   # alpha = 2/3: (0, 2/3*3 / (1 - 1/9))
        [0.0, 2.25]
    """
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        return y
    alpha = 2.0 / (max(span, 1) + 1.0)
    d = 1.0 - alpha
    if d <= 0.0:
        return y.copy()
    k = max(1, int(8.0 / -math.log(d)))           # block length: d**-k <= e**8
    out = np.empty_like(y)
    carry = 0.0
    for start in range(0, len(y), k):
        block = y[start:start + k]
        t = np.arange(len(block), dtype=float)
        grow = d ** -t                               # d**-s within the block (<= e**8)
        acc = carry + np.cumsum(alpha * block * grow)
        out[start:start + k] = acc / grow
        carry = out[start + len(block) - 1] * d      # the average carried into the next block, decayed once
    # bias correction: the weights of the first t points sum to 1 - d**(t+1)
    return out / -np.expm1((np.arange(len(y)) + 1.0) * math.log(d))


def png_rgb(rgba, width: int, height: int) -> bytes:
    """An RGB PNG of an RGBA pixel buffer (``height`` rows of ``width`` pixels), zlib level 1,
    no row filter.

    Written by hand because the encoders at hand cost more per frame for a plot (measured at
    1000x560: Pillow's PNG at level 1 about 1.5x this, lossless WebP 2x) and the frame is sent
    once and shown at once; the alpha channel is dropped (the figure is opaque).

    Example:
        >>> png_rgb(bytes([255, 0, 0, 255]) * 4, 2, 2)[:4]
        b'\\x89PNG'
    """
    pixels = np.frombuffer(rgba, dtype=np.uint8).reshape(height, width, 4)
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)      # filter byte 0 (none), then RGB
    rows[:, 1:].reshape(height, width, 3)[:] = pixels[:, :, :3]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, not interlaced
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.data, 1))
            + chunk(b"IEND", b""))


class LiveFigure:
    """A 2x2 figure of one or several runs against one x axis: loss (per step faint, smoothed,
    test), the test metric, the learning rate (with the noise scale on a twin axis when
    recorded) and examples/s (peak memory in its title when recorded).

    Args:
        labels: one label per run (the legend).
        metric: the eval column to plot (default: the first ``eval_*`` column other than the loss).
        x: the x axis of every panel: ``"step"``, ``"examples"`` or ``"time"`` (training seconds).
        dpi, figsize: the PNG's resolution and size in inches (default 1000x560 px, the size the
            panels show it at, so the text is drawn crisp and not rescaled).
        live: True for frames (``png``): the axes, ticks and labels are drawn once and kept as a
            background while the limits stay put (they grow with headroom, so most frames only
            redraw the lines). False for a static figure to display or save (``figure``).

    Example:
        >>> from nbbatch import History
        >>> h = History(); h.steps.append({"step": 1, "examples": 8, "time": 0.1, "loss": 2.0, "lr": 0.1})
        >>> fig = LiveFigure(["B=8"]); png = fig.png([h]); png[:4]
        b'\\x89PNG'
    """

    def __init__(self, labels: Sequence[str], metric: str | None = None, x: str = "step", dpi: int = 100,
                 figsize: tuple[float, float] = (10.0, 5.6), live: bool = True):
        if not labels:
            raise ValueError("labels: give at least one run label")
        if x not in X_AXES:
            raise ValueError(f"x={x!r} is not known; use one of {tuple(X_AXES)}")
        self.labels = [str(v) for v in labels]
        self.metric = metric
        self.x = x
        self.figure = Figure(figsize=figsize, dpi=dpi)
        # fixed margins: a layout engine would re-measure every text on each frame
        self.figure.subplots_adjust(left=0.075, right=0.93, bottom=0.095, top=0.93, wspace=0.24, hspace=0.3)
        self.canvas = FigureCanvasAgg(self.figure)
        axes = self.figure.subplots(2, 2, sharex=True)
        self.axes = {title: ax for (_, title), ax in zip(PANELS, axes.flat)}
        self._columns = int(figsize[0] * dpi * 0.42)       # pixel columns of one axes
        formatter = FuncFormatter(compact)
        self._lines: dict = {}
        multi = len(self.labels) > 1
        for (y, title), ax in zip(PANELS, axes.flat):
            ax.set_title(title, fontsize=10, y=1.0)   # a fixed position: no re-measuring per frame
            ax.tick_params(labelsize=8.5)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.xaxis.set_major_formatter(formatter)
            if y != "loss":
                ax.yaxis.set_major_locator(MaxNLocator(5))
                ax.yaxis.set_major_formatter(formatter)
            if ax in axes[1]:
                ax.set_xlabel(X_AXES[x], fontsize=9)
            # fixed label positions (axes fractions, just past the longest tick labels): placed
            # automatically, every full render would measure the tick labels of all four axes again
            ax.xaxis.set_label_coords(0.5, LABEL_X)
            ax.yaxis.set_label_coords(LABEL_Y, 0.5)
            for i, label in enumerate(self.labels):
                c = f"C{i % 10}"
                if y == "loss":
                    self._lines[("raw", i)] = ax.plot([], [], color=c, lw=0.6, alpha=0.25)[0]
                    self._lines[("smooth", i)] = ax.plot([], [], color=c, lw=1.6)[0]
                    self._lines[("eval", i)] = ax.plot([], [], "o-", color=c, ms=3.5, lw=0.8, mfc="white")[0]
                elif y == "metric":
                    self._lines[("metric", i)] = ax.plot([], [], "o-", color=c, ms=3.5, lw=1.2, mfc="white")[0]
                else:
                    self._lines[(y, i)] = ax.plot([], [], color=c, lw=1.2)[0]
        loss_ax = self.axes["loss"]
        loss_ax.set_yscale("log")
        self._log_formatters()
        loss_ax.set_ylabel("loss", fontsize=9)
        self.axes["test metric"].set_ylabel("test metric", fontsize=9)
        self.axes["learning rate"].set_ylabel("lr", fontsize=9)
        self.axes["examples/s"].set_ylabel("examples/s", fontsize=9)
        grey = "0.35"
        handles = [Line2D([], [], color=grey, lw=0.6, alpha=0.4), Line2D([], [], color=grey, lw=1.6),
                   Line2D([], [], color=grey, marker="o", ms=3.5, lw=0.8, mfc="white")]
        names = ["train, per step", "train, smoothed", "test"]
        if multi:   # colours name the runs, the grey styles name the curves
            handles = [Line2D([], [], color=f"C{i % 10}", lw=1.6) for i in range(len(self.labels))] + handles
            names = self.labels + names
        # opaque: in live frames its pixels from the background are pasted back over the lines
        # (the same picture as drawing it last, without laying out its text on every frame)
        self._legend = loss_ax.legend(handles, names, fontsize=8, loc="upper right", framealpha=1.0,
                                      ncol=2 if multi and len(names) > 5 else 1)
        self.live = bool(live)
        for artist in self._lines.values():
            artist.set_animated(self.live)       # drawn over the kept background by png()
        self._background = None      # the rendered figure without its data, while the limits hold
        self._fixed_pixels = None    # the legend's box and the titles cut from the first background
        self._titles = None
        self._key = None
        self._fitted: set = set()     # axes whose limits were set from data once
        self.x_end: float | None = None   # the x axis grows no further (the run's last step), when known
        self._short = False
        self.full_draws = 0
        self._noise_ax = None
        self.renders = 0
        self.render_seconds = 0.0

    def _log_formatters(self) -> None:
        # plain numbers on the log loss axis ("2", "0.3"); on a range under ~1.5 decades also the
        # minor ticks at 2, 3 and 5 times a power of ten, so the axis never shows a single label
        ax = self.axes["loss"]

        def minor(value, _pos=None):
            lo, hi = ax.get_ylim()
            if lo <= 0 or hi / lo > 30:
                return ""
            mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
            return compact(value) if mantissa in (2, 3, 5) else ""
        ax.yaxis.set_major_formatter(FuncFormatter(compact))
        ax.yaxis.set_minor_formatter(FuncFormatter(minor))

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
        name = "test " + metric[5:].replace("_", " ") if metric else "test metric"
        self.axes["test metric"].set_title(name, fontsize=10)
        self.axes["test metric"].set_ylabel(name, fontsize=9)
        cols = self._columns
        self._short = False       # the runs end within SHORT_RUN_S at their pace so far: no growing x axis
        if self.x_end is not None:
            for s in snaps:
                xs, ts = s["steps"].get(self.x, []), s["steps"].get("time", [])
                if len(xs) and len(ts) and xs[-1] and ts[-1] and float(ts[-1]) * self.x_end / float(xs[-1]) <= SHORT_RUN_S:
                    self._short = True
        peaks, noise, losses = [], [], []
        for i, s in enumerate(snaps):
            st, ev = s["steps"], s["evals"]
            x, loss = _xy(st.get(self.x, []), st.get("loss", []))
            ex, eloss = _xy(ev.get(self.x, []), ev.get("eval_loss", []))
            losses += [loss, eloss]
            self._lines[("raw", i)].set_data(*envelope(x, loss, cols))
            span = max(5, int(SMOOTH_FRACTION * len(loss)))
            self._lines[("smooth", i)].set_data(*envelope(x, smooth(loss, span), cols))
            self._lines[("eval", i)].set_data(ex, eloss)
            mx, my = _xy(ev.get(self.x, []), ev.get(metric, [])) if metric else (np.empty(0), np.empty(0))
            self._lines[("metric", i)].set_data(mx, my)
            self._lines[("lr", i)].set_data(*envelope(*_xy(st.get(self.x, []), st.get("lr", [])), cols))
            sx, speed = _xy(st.get(self.x, []), st.get("examples_per_s", []))   # per step it jitters: smoothed
            self._lines[("examples_per_s", i)].set_data(*envelope(sx, smooth(speed, max(5, int(SMOOTH_FRACTION * len(speed)))), cols))
            mem = [m for m in st.get("peak_memory", []) if m is not None]
            if mem:
                peaks.append(max(mem))
            for col in NOISE_COLUMNS:
                if col in st and any(v is not None for v in st[col]):
                    noise.append((i, *_xy(st.get(self.x, []), st[col])))
                    break
        # A log axis cannot show a loss <= 0 (a custom loss may have one): then a linear axis.
        scale = "log" if all(np.all(v > 0) for v in losses) else "linear"
        if self.axes["loss"].get_yscale() != scale:
            self.axes["loss"].set_yscale(scale)
            self._fitted.discard(self.axes["loss"])
            if scale == "log":
                self._log_formatters()
        self.axes["examples/s"].set_title(
            "examples/s" + (f"  (peak memory {max(peaks) / 2**20:.0f} MiB)" if peaks else ""), fontsize=10)
        if noise:
            if self._noise_ax is None:
                self._noise_ax = self.axes["learning rate"].twinx()
                self._noise_ax.set_ylabel("noise scale B_simple (dotted)", fontsize=9)
                self._noise_ax.tick_params(labelsize=8.5)
                self._noise_ax.yaxis.set_major_formatter(FuncFormatter(compact))
                self._noise_ax.yaxis.set_label_coords(1.0 - LABEL_Y, 0.5)
            for i, xs, ys in noise:
                key = ("noise", i)
                if key not in self._lines:
                    self._lines[key] = self._noise_ax.plot([], [], ":", color=f"C{i % 10}", lw=1.2)[0]
                    self._lines[key].set_animated(self.live)
                self._lines[key].set_data(*envelope(xs, ys, cols))
        for ax in list(self.axes.values()) + ([self._noise_ax] if self._noise_ax is not None else []):
            ax.relim()
            if self.live:
                self._sticky_limits(ax)
            else:
                ax.autoscale_view()

    def set_x_end(self, ends: Sequence[int | None], batch_sizes: Sequence[int]) -> None:
        """The x axis grows ahead of the data up to the runs' planned end (``ends`` in steps),
        where the x unit allows; near the end it stops there instead of overshooting."""
        known = [e for e in ends if e is not None]
        if not known or self.x == "time":
            self.x_end = None
        elif self.x == "step":
            self.x_end = float(max(known))
        else:
            self.x_end = float(max(e * b for e, b in zip(ends, batch_sizes) if e is not None))

    def _sticky_limits(self, ax) -> None:
        """Change an axes' limits only when its data leave them (or shrink to a small part of them),
        and then by large steps, so that a run changes them a few times only (each change costs a
        full render, several times a frame that only redraws the lines):

        - x: a quarter, a sixteenth, ... of the runs' planned end (the whole run once the data
          pass a quarter of it), or without a known end the next 1-2-5 value above twice the data;
        - y: the data with 5% margins, and at least twice the former span (in decades on a log
          axis, there at most one decade more), the extra room on the side the data just crossed (a falling loss, a rising
          accuracy keep going that way); shrunk to the data when they fill under a quarter of it.
        """
        ax.set_autoscale_on(False)             # matplotlib would rescale at draw time otherwise
        box = ax.dataLim
        if not (np.all(np.isfinite(box.get_points())) and box.width >= 0 and ax.has_data()):
            return
        (x0, x1), (y0, y1) = box.intervalx, box.intervaly
        if y1 - y0 <= 1e-6 * max(abs(y0), abs(y1)):   # constant up to rounding (a smoothed constant)
            y0 = y1 = (y0 + y1) / 2
        first = ax not in self._fitted
        self._fitted.add(ax)
        (cx0, cx1), (cy0, cy1) = ax.get_xlim(), ax.get_ylim()
        log = ax.get_yscale() == "log" and y0 > 0
        if first or x0 < cx0 or x1 > cx1:
            ax.set_xlim(*x_limits(x0, x1, self.x_end, whole=self._short))
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        inv = (lambda v: 10.0 ** v) if log else (lambda v: v)
        old_ok = not first and (not log or cy0 > 0)
        span = f(cy1) - f(cy0) if old_ok else 0.0
        y_out = first or y0 < cy0 or y1 > cy1
        y_small = y1 > y0 and span > 0 and f(y1) - f(y0) < 0.25 * span
        if not (y_out or y_small):
            return
        lo, hi = f(y0), f(y1)
        if hi == lo:
            pad = 0.18 if log else (abs(y0) * 0.1 or 1.0)
            lo, hi = lo - pad, hi + pad
        else:
            lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
        if y_out and old_ok and span > 0 and hi - lo < 2 * span:
            extra = 2 * span - (hi - lo)
            if log:
                extra = min(extra, 1.0)        # at most a decade more: one bad batch is no reason for five
            if y0 < cy0 and not y1 > cy1:
                lo -= extra
            elif y1 > cy1 and not y0 < cy0:
                hi += extra
            else:
                lo, hi = lo - extra / 2, hi + extra / 2
        ax.set_ylim(*_nice(inv(lo), inv(hi), log=log))

    def _render_background(self, axes, titles) -> None:
        """Draw everything but the data lines and keep it. The legend and the titles do not
        move when limits change: their pixels from the first render are pasted back instead of
        laying their text out again (about a fifth of a full render), until a title changes."""
        fixed = [self._legend] + [ax.title for ax in axes]
        reuse = self._fixed_pixels is not None and titles == self._titles
        if reuse:
            for artist in fixed:
                artist.set_visible(False)
        try:
            self.canvas.draw()                 # animated artists (the data lines) are left out
        finally:
            for artist in fixed:
                artist.set_visible(True)
        if reuse:
            for pixels in self._fixed_pixels:
                self.canvas.restore_region(pixels)
        else:
            renderer = self.canvas.get_renderer()
            # the legend's box (opaque) first: png() pastes it over the lines of every frame
            self._fixed_pixels = [self.canvas.copy_from_bbox(a.get_window_extent(renderer)) for a in fixed]
            self._titles = titles
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)

    def png(self, histories: Sequence | None = None) -> bytes:
        """Render (after ``update(histories)`` when given) and return PNG bytes."""
        t0 = time.perf_counter()
        if histories is not None:
            self.update(histories)
        buf = io.BytesIO()
        if not self.live:
            self.canvas.print_png(buf, pil_kwargs={"compress_level": 1})
        else:
            axes = list(self.axes.values()) + ([self._noise_ax] if self._noise_ax is not None else [])
            key = tuple((ax.get_xlim(), ax.get_ylim(), ax.get_yscale(), ax.get_title()) for ax in axes)
            if key != self._key or self._background is None:
                self._render_background(axes, tuple(ax.get_title() for ax in axes))
                self._key = key
                self.full_draws += 1
            else:
                self.canvas.restore_region(self._background)
            for line in self._lines.values():
                if line.axes is not None:
                    line.axes.draw_artist(line)
            self.canvas.restore_region(self._fixed_pixels[0])   # the legend over the lines
            w, h = self.canvas.get_width_height()
            buf.write(png_rgb(self.canvas.buffer_rgba(), w, h))
        self.renders += 1
        self.render_seconds += time.perf_counter() - t0
        return buf.getvalue()


class Refresher:
    """Redraw from a daemon thread while training: ``tick()`` often, ``draw()`` throttled.

    The first frame comes ``first`` s after ``start()``. Then ``draw`` (the figure) runs every
    ``max(interval, cost / budget)`` s, where ``cost`` is the time the last frame took, but never
    less often than every ``max_gap`` s: with ``budget=0.08`` a frame of 50 ms comes every
    second (5% of the wall time) and one of 120 ms (a full render on a loaded machine) every 1.5 s. ``tick`` (status line, progress bar)
    runs every ``min(interval, 0.5)`` s. Whatever happened in between is drawn once
    (coalesced). ``final()`` stops the thread and draws the last frame (the static one).

    Example:
        >>> frames = []
        >>> r = Refresher(lambda: frames.append(1), interval=0.01)
        >>> r.start(); r.final(); r.final_frames, len(frames) >= 1
        (1, True)
    """

    def __init__(self, draw: Callable[[], None], interval: float = 1.0, budget: float = 0.08,
                 tick: Callable[[], None] | None = None, first: float = 0.5, max_gap: float = 1.8):
        for name, value in (("refresh interval", interval), ("first", first), ("max_gap", max_gap)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a number > 0 seconds, got {value!r}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must lie in (0, 1], got {budget!r}")
        self.draw, self.tick, self.interval, self.budget = draw, tick, float(interval), float(budget)
        self.first, self.max_gap = float(first), max(float(max_gap), float(interval))
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

    def gap(self) -> float:
        """Seconds from one frame to the next at the last frame's cost."""
        return min(max(self.interval, self.cost / self.budget), self.max_gap)

    def _loop(self) -> None:
        begin = time.perf_counter()
        next_draw = begin + self.first
        tick_every = min(self.interval, 0.5)
        while not self._quit:
            now = time.perf_counter()
            self._wake.wait(max(0.0, min(tick_every, next_draw - now)))
            self._wake.clear()
            if self._quit:
                break
            if self.tick is not None:
                self._call(self.tick)
            if time.perf_counter() >= next_draw:
                self.cost = self._call(self.draw)
                next_draw = time.perf_counter() + self.gap() - self.cost

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
