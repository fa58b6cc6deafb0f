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

Run:  .venv/bin/python bench/bench_live.py [--repeats 3] [--epochs 40] [--quick]
"""

from __future__ import annotations

import argparse
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


def live(build, batch_size, epochs):
    panel = TrainingPanel(build=build, epochs=epochs, values={"batch_size": batch_size, **VALUES})
    panel._build()                      # construction (and its empty frame) outside the timing
    frames, ended = [], []
    panel.image.observe(lambda ch: frames.append(time.perf_counter()), names="value")
    panel.trainer.add_callback("fit_end", lambda t, row: ended.append(time.perf_counter()))
    c0, t0 = cpu_seconds(), time.perf_counter()
    panel.train_button.click()
    panel.controller.wait()
    cpu = cpu_seconds() - c0
    panel.close()
    train_s = ended[0] - t0
    during = [f - t0 for f in frames if f <= ended[0]]
    gaps = [b - a for a, b in zip([0.0] + during, during)]
    return {"train_s": train_s, "cpu_s": cpu, "first": during[0] if during else float("nan"), "frames": len(during),
            "max_gap": max(gaps + [train_s - (during[-1] if during else 0.0)])}


def frame_cost(n_steps, repeats=5):
    h = History()
    for i in range(1, n_steps + 1):
        h.steps.append({"step": i, "epoch": i / 125, "examples": 32 * i, "time": i * 1e-3,
                        "loss": 2.3 * (1 + i) ** -0.3 * (1 + 0.3 * ((i * 7919) % 13 - 6) / 6), "lr": 0.05,
                        "examples_per_s": 30000.0})
        if i % 125 == 0:
            h.evals.append({"step": i, "epoch": i / 125, "examples": 32 * i, "time": i * 1e-3,
                            "eval_loss": 2.3 * (1 + i) ** -0.25, "eval_accuracy": 1 - (1 + i) ** -0.2})
    fig = LiveFigure(["B=32"])
    fig.png([h])
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fig.png([h])
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), fig.figure.get_size_inches() * fig.figure.dpi


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=40)
    ap.add_argument("--batch-sizes", default="32,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair of 4 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs = 1, 4
    torch.set_num_threads(args.threads)
    build = default_builder(data.mnist1d(), device="cpu")
    print(f"# nbbatch live-figure benchmark: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| history steps | frame ms (median) | PNG px |")
    print("|---|---|---|")
    for n in (1_000, 10_000, 100_000):
        cost, px = frame_cost(n)
        print(f"| {n} | {1000 * cost:.0f} | {px[0]:.0f}x{px[1]:.0f} |")
    print(f"\n# panel vs headless Trainer.fit, {args.repeats} interleaved pairs, {args.epochs:g} epochs of mnist1d")
    print("| batch | fit s | panel s | ratio of medians | paired ratios | CPU ratio (paired, median) "
          "| first frame s | frames/s | max gap s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        fit, pan = [], []
        for r in range(args.repeats):
            for which in (("fit", "live") if r % 2 == 0 else ("live", "fit")):
                if which == "fit":
                    fit.append(headless(build, b, args.epochs))
                else:
                    pan.append(live(build, b, args.epochs))
        ps = [p["train_s"] for p in pan]
        fs = [f[0] for f in fit]
        paired = sorted(p / f for p, f in zip(ps, fs))
        cpu = statistics.median(p["cpu_s"] / f[1] for p, f in zip(pan, fit))
        print(f"| {b} | {statistics.median(fs):.2f} | {statistics.median(ps):.2f} | "
              f"{statistics.median(ps) / statistics.median(fs):.3f} | {', '.join(f'{x:.3f}' for x in paired)} | "
              f"{cpu:.3f} | "
              f"{statistics.median(p['first'] for p in pan):.2f} | "
              f"{statistics.median(p['frames'] / p['train_s'] for p in pan):.2f} | "
              f"{max(p['max_gap'] for p in pan):.2f} |")


if __name__ == "__main__":
    main()
