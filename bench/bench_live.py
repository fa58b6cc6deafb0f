"""Benchmark: the live figure's frame rate, time to first frame and overhead against a headless fit.

The same run (mnist1d MLP, momentum SGD, fixed seed) is trained by ``Trainer.fit`` in the main
thread (no figure) and from a ``TrainingPanel`` (training thread + live-figure thread),
interleaved A/B/A/B. For the panel every change of its image is time-stamped (an observer on
the ``Image`` widget's ``value``, as a browser would see it), so the benchmark measures what a
participant sees: the time from the Train click to the first frame that shows data, the gaps
between frames while training, and the frames per second. It also renders the figure alone for
a history of 1k, 10k and 100k steps (the cost of one frame as a run grows).

The machine it runs on may be shared: wall times then carry other jobs' noise. The process CPU
time (user + system, all threads) of each run is reported too: the CPU ratio is the overhead the
figure adds on a one-core machine such as Binder's, and it barely depends on other load.

``--baseline PATH`` loads another version of ``nbbatch/ui/plots.py`` (e.g. one extracted with
``git show REV:nbbatch/ui/plots.py``) and runs the panel with its ``LiveFigure`` and ``Refresher``
as a third arm of the same interleaved pairs: before and after side by side on the same load.

``--widgets`` compares the kernel-side CPU of one frame with what a browser-side widget costs:
ipympl (Agg in the kernel too, a PNG of the changed pixels per frame) and bqplot (the data
arrays sent, drawn by the browser), where installed.

Run:  .venv/bin/python bench/bench_live.py [--repeats 3] [--epochs 40] [--quick] [--baseline old_plots.py] [--widgets]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbbatch import History, data  # noqa: E402
from nbbatch.ui import LiveFigure, TrainingPanel, default_builder  # noqa: E402
from nbbatch.ui import panel as panel_module  # noqa: E402
from nbbatch.ui.plots import envelope  # noqa: E402

VALUES = {"model": "mlp", "norm": "none", "lr": 0.05, "warmup_steps": 0, "optimizer": "momentum",
          "accumulate": 1, "precision": "fp32"}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def headless(build, batch_size, epochs):
    t = build(batch_size=batch_size, **VALUES)
    c0, t0 = cpu_seconds(), time.perf_counter()
    t.fit(epochs=epochs, progress=False)
    return time.perf_counter() - t0, cpu_seconds() - c0


def load_plots(path):
    """Another version of nbbatch/ui/plots.py as a module (its LiveFigure and Refresher)."""
    spec = importlib.util.spec_from_file_location("nbbatch_plots_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def plots_of(module):
    """The panel draws with ``module``'s LiveFigure and Refresher inside the block."""
    if module is None:
        yield
        return
    saved = panel_module.LiveFigure, panel_module.Refresher
    panel_module.LiveFigure, panel_module.Refresher = module.LiveFigure, module.Refresher
    try:
        yield
    finally:
        panel_module.LiveFigure, panel_module.Refresher = saved


def live(build, batch_size, epochs, plots=None):
    with plots_of(plots):
        return _live(build, batch_size, epochs)


def _live(build, batch_size, epochs):
    panel = TrainingPanel(build=build, epochs=epochs, values={"batch_size": batch_size, **VALUES})
    panel._build()                      # construction (and its empty frame) outside the timing
    frames, ended = [], []
    panel.image.observe(lambda ch: frames.append(time.perf_counter()), names="value")
    panel.trainer.add_callback("fit_end", lambda t, row: ended.append(time.perf_counter()))
    c0, t0 = cpu_seconds(), time.perf_counter()
    panel.train_button.click()
    panel.controller.wait()
    cpu = cpu_seconds() - c0
    full = getattr(panel._figure, "full_draws", float("nan")) - 1   # less the empty frame before Train
    panel.close()
    train_s = ended[0] - t0
    during = [f - t0 for f in frames if f <= ended[0]]
    gaps = [b - a for a, b in zip([0.0] + during, during)]
    return {"train_s": train_s, "cpu_s": cpu, "first": during[0] if during else float("nan"), "frames": len(during),
            "max_gap": max(gaps + [train_s - (during[-1] if during else 0.0)]), "full": full,
            "all_frames": len(frames)}


def synthetic_history(n_steps):
    h = History()
    for i in range(1, n_steps + 1):
        h.steps.append({"step": i, "epoch": i / 125, "examples": 32 * i, "time": i * 1e-3,
                        "loss": 2.3 * (1 + i) ** -0.3 * (1 + 0.3 * ((i * 7919) % 13 - 6) / 6), "lr": 0.05,
                        "examples_per_s": 30000.0})
        if i % 125 == 0:
            h.evals.append({"step": i, "epoch": i / 125, "examples": 32 * i, "time": i * 1e-3,
                            "eval_loss": 2.3 * (1 + i) ** -0.25, "eval_accuracy": 1 - (1 + i) ** -0.2})
    return h


def frame_cost(n_steps, repeats=5, figure_class=LiveFigure):
    h = synthetic_history(n_steps)
    fig = figure_class(["B=32"])
    fig.png([h])
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fig.png([h])
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), fig.figure.get_size_inches() * fig.figure.dpi


def _median_cpu(fn, repeats=7):
    """Median thread CPU seconds of ``fn()`` (the kernel-side cost, whatever else the machine runs)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts)


def widget_costs(n_steps=2000):
    """Kernel-side CPU ms of one frame: this Agg path (kept background, and a full render) against
    ipympl and bqplot, each showing the same history (the lines cut to the same envelope)."""
    h = synthetic_history(n_steps)
    rows = []
    fig = LiveFigure(["B=32"])
    fig.png([h])
    rows.append(("Agg + PNG into an Image (this panel), background kept", _median_cpu(lambda: fig.png([h]))))

    def full():
        fig._key = None
        fig.png([h])
    rows.append(("Agg + PNG into an Image (this panel), full render", _median_cpu(full)))
    try:
        from ipympl.backend_nbagg import Canvas, FigureManager
    except ImportError:
        rows.append(("ipympl", None))
    else:
        ifig = LiveFigure(["B=32"], live=False)
        canvas = Canvas(ifig.figure)
        manager = FigureManager(canvas, 1)
        manager.web_sockets = set()        # no browser: the frame is encoded, not sent

        def ipympl_frame():
            # what ipympl does per update: set the data, draw the figure, PNG of the changed pixels
            ifig.update([h])
            canvas.draw()
            canvas.get_diff_image()
        canvas.draw()
        canvas.get_diff_image()
        rows.append(("ipympl (set_data, draw, PNG diff)", _median_cpu(ipympl_frame)))
    try:
        import bqplot as bq
    except ImportError:
        rows.append(("bqplot", None))
    else:
        from nbbatch.ui.plots import _xy, smooth
        xs, ys = bq.LinearScale(), bq.LogScale()
        marks = [bq.Lines(x=[0.0], y=[1.0], scales={"x": xs, "y": ys}) for _ in range(4)]
        bfig = bq.Figure(marks=marks, axes=[bq.Axis(scale=xs), bq.Axis(scale=ys, orientation="vertical")])

        def bqplot_frame():
            # the same data preparation as LiveFigure.update (snapshot, envelope, smoothing), then
            # the arrays are serialised into widget messages; the browser draws them
            from nbbatch.ui.plots import snapshot
            st = snapshot(h)["steps"]
            x, loss = _xy(st["step"], st["loss"])
            data = [envelope(x, loss, 420), envelope(x, smooth(loss, max(5, len(loss) // 50)), 420),
                    envelope(*_xy(st["step"], st["lr"]), 420), envelope(*_xy(st["step"], st["examples_per_s"]), 420)]
            with bfig.hold_sync():
                for mark, (mx, my) in zip(marks, data):
                    with mark.hold_sync():
                        mark.x, mark.y = mx, my
        rows.append(("bqplot (data arrays into 4 Lines marks, drawn by the browser)", _median_cpu(bqplot_frame)))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=40)
    ap.add_argument("--batch-sizes", default="32,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair of 4 epochs")
    ap.add_argument("--baseline", default=None, help="another plots.py to run as a third arm (before/after)")
    ap.add_argument("--widgets", action="store_true", help="kernel CPU per frame against ipympl and bqplot")
    ap.add_argument("--no-panel", action="store_true", help="only the frame costs")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs = 1, 4
    torch.set_num_threads(args.threads)
    build = default_builder(data.mnist1d(), device="cpu")
    print(f"# nbbatch live-figure benchmark: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    base = load_plots(args.baseline) if args.baseline else None
    print("| history steps | frame ms (median) | PNG px |" + (" baseline frame ms |" if base else ""))
    print("|---|---|---|" + ("---|" if base else ""))
    for n in (1_000, 10_000, 100_000):
        cost, px = frame_cost(n)
        extra = f" {1000 * frame_cost(n, figure_class=base.LiveFigure)[0]:.0f} |" if base else ""
        print(f"| {n} | {1000 * cost:.0f} | {px[0]:.0f}x{px[1]:.0f} |{extra}")
    if args.widgets:
        print("\n# kernel-side CPU of one frame (thread CPU, median), history of 2000 steps")
        print("| how | CPU ms per frame |")
        print("|---|---|")
        for name, cost in widget_costs():
            print(f"| {name} | {'not installed' if cost is None else f'{1000 * cost:.1f}'} |")
    if args.no_panel:
        return
    print(f"\n# panel vs headless Trainer.fit, {args.repeats} interleaved pairs, {args.epochs:g} epochs of mnist1d")
    arms = [("panel", None)] + ([("baseline", base)] if base else [])
    print("| batch | arm | fit s | panel s | ratio of medians | paired ratios | CPU ratio (paired, median) "
          "| first frame s | frames/s | max gap s | full renders / frames |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        fit, pan = [], {name: [] for name, _ in arms}
        for r in range(args.repeats):
            order = ["fit"] + [name for name, _ in arms]
            if r % 2:
                order.reverse()
            for which in order:
                if which == "fit":
                    fit.append(headless(build, b, args.epochs))
                else:
                    pan[which].append(live(build, b, args.epochs, dict(arms)[which]))
        fs = [f[0] for f in fit]
        for name, _ in arms:
            runs = pan[name]
            ps = [p["train_s"] for p in runs]
            paired = sorted(p / f for p, f in zip(ps, fs))
            cpu = statistics.median(p["cpu_s"] / f[1] for p, f in zip(runs, fit))
            print(f"| {b} | {name} | {statistics.median(fs):.2f} | {statistics.median(ps):.2f} | "
                  f"{statistics.median(ps) / statistics.median(fs):.3f} | {', '.join(f'{x:.3f}' for x in paired)} | "
                  f"{cpu:.3f} | "
                  f"{statistics.median(p['first'] for p in runs):.2f} | "
                  f"{statistics.median(p['frames'] / p['train_s'] for p in runs):.2f} | "
                  f"{max(p['max_gap'] for p in runs):.2f} | "
                  f"{statistics.median(p['full'] for p in runs):g} / {statistics.median(p['all_frames'] for p in runs):g} |",
                  flush=True)


if __name__ == "__main__":
    main()
