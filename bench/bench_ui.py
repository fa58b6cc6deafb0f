"""Benchmark: what the live panel costs, and how fast Stop halts training.

1. **Panel vs headless fit.** The same run (mnist1d MLP, momentum SGD, fixed seed) is trained by
   ``Trainer.fit`` in the main thread (headless, no figure) and from a ``TrainingPanel`` at its
   default refresh (a background training thread, the live figure redrawn by a second thread),
   interleaved A/B/A/B. Timed: from the call (``fit``, or the Train click) until training has
   halted (``fit`` returned; for the panel its ``fit_end`` in the training thread), and for the
   panel also until its thread ended after drawing the final, static frame.
   Reported: median seconds, ratio of medians, the median of the paired ratios (with min-max),
   the ratio of the best runs, and the frames the panel drew during training. Before timing it checks that both end with identical weights.
2. **Stop latency.** The panel trains; after a random delay Stop is clicked; the controller
   records the time and the optimizer steps from the click until the training thread halted.
   Reported: median and max in ms and in steps, next to the median step time.

Run:  .venv/bin/python bench/bench_ui.py [--repeats 5] [--epochs 20] [--stops 20] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbbatch import data  # noqa: E402
from nbbatch.ui import TrainingPanel, default_builder  # noqa: E402

VALUES = {"model": "mlp", "norm": "none", "lr": 0.05, "warmup_steps": 0, "optimizer": "momentum",
          "accumulate": 1, "precision": "fp32"}


def headless_fit(build, batch_size: int, epochs: float):
    trainer = build(batch_size=batch_size, **VALUES)
    t0 = time.perf_counter()
    trainer.fit(epochs=epochs, progress=False)
    return time.perf_counter() - t0, trainer, None


def panel_fit(build, batch_size: int, epochs: float, refresh: float):
    panel = TrainingPanel(build=build, epochs=epochs, refresh=refresh, values={"batch_size": batch_size, **VALUES})
    panel._build()                           # construction outside the timing, as for fit
    ended = []
    panel.trainer.add_callback("fit_end", lambda t, row: ended.append(time.perf_counter()))
    t0 = time.perf_counter()
    panel.train_button.click()
    panel.controller.wait()
    t1 = time.perf_counter()
    frames = panel._refresher.frames
    panel.close()
    return (ended[0] - t0, t1 - t0), panel.trainer, frames


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def bench_overhead(build, batch_size, epochs, repeats, refresh):
    _, ref, _ = headless_fit(build, batch_size, epochs)
    _, pan, _ = panel_fit(build, batch_size, epochs, refresh)
    assert same_weights(ref, pan), "the panel and fit must train the same run"
    steps = ref.step_count
    fit_t, panel_t, final_t, frames = [], [], [], []
    for r in range(repeats):
        order = (("fit", "panel") if r % 2 == 0 else ("panel", "fit"))
        for which in order:
            if which == "fit":
                fit_t.append(headless_fit(build, batch_size, epochs)[0])
            else:
                (dt, dt_final), _, f = panel_fit(build, batch_size, epochs, refresh)
                panel_t.append(dt)
                final_t.append(dt_final)
                frames.append(f)
    paired = [p / f for p, f in zip(panel_t, fit_t)]
    return {"batch_size": batch_size, "steps": steps, "fit_s": statistics.median(fit_t),
            "panel_s": statistics.median(panel_t), "ratio": statistics.median(panel_t) / statistics.median(fit_t),
            "paired": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired),
            "frames": statistics.median(frames), "best_ratio": min(panel_t) / min(fit_t),
            "final_s": statistics.median(final_t), "final_ratio": statistics.median(final_t) / statistics.median(fit_t)}


def bench_stop(build, batch_size, stops, seed=0):
    rng = random.Random(seed)
    panel = TrainingPanel(build=build, epochs=10_000, refresh=1.0, values={"batch_size": batch_size, **VALUES})
    ms, steps, step_ms = [], [], []
    try:
        for _ in range(stops):
            panel.train_button.click()
            time.sleep(rng.uniform(0.1, 0.4))
            panel.stop_button.click()
            panel.controller.wait()
            lat = panel.controller.stop_latency[-1]
            ms.append(1000 * lat["seconds"])
            steps.append(lat["steps"])
        t = panel.trainer.history.steps["time"]
        step_ms = [1000 * (b - a) for a, b in zip(t, t[1:])]
    finally:
        panel.close()
    return {"batch_size": batch_size, "stops": stops, "median_ms": statistics.median(ms), "max_ms": max(ms),
            "median_steps": statistics.median(steps), "max_steps": max(steps),
            "step_ms": statistics.median(step_ms)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--batch-sizes", default="32,256")
    ap.add_argument("--stops", type=int, default=20)
    ap.add_argument("--refresh", type=float, default=1.0, help="the panel's refresh (default: its default, 1 s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repeats of 2 epochs, 5 stops")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.stops = 2, 2, 5
    torch.set_num_threads(args.threads)
    d = data.mnist1d()
    build = default_builder(d, device="cpu")
    print(f"# nbbatch UI benchmark: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), python {platform.python_version()}")
    print(f"# panel at refresh={args.refresh}s vs headless Trainer.fit, {args.repeats} interleaved pairs, "
          f"{args.epochs:g} epochs of mnist1d (4000 examples), MLP 40-100-100-10, momentum SGD")
    print("| batch | steps | fit s (median) | panel s (median) | ratio of medians | paired ratio (min-max) | best/best "
          "| frames | panel s incl. final frame (ratio) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        r = bench_overhead(build, b, args.epochs, args.repeats, args.refresh)
        print(f"| {b} | {r['steps']} | {r['fit_s']:.2f} | {r['panel_s']:.2f} | {r['ratio']:.3f} | "
              f"{r['paired']:.3f} ({r['paired_min']:.3f}-{r['paired_max']:.3f}) | {r['best_ratio']:.3f} | {r['frames']:.0f} | "
              f"{r['final_s']:.2f} ({r['final_ratio']:.3f}) |")
    print(f"\n# Stop click to training thread halted, {args.stops} stops at random times")
    print("| batch | median ms | max ms | median steps | max steps | median step ms |")
    print("|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        s = bench_stop(build, b, args.stops)
        print(f"| {b} | {s['median_ms']:.2f} | {s['max_ms']:.2f} | {s['median_steps']:.0f} | {s['max_steps']} | "
              f"{s['step_ms']:.2f} |")


if __name__ == "__main__":
    main()
