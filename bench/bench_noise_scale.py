"""Benchmark: the cost of the online gradient-noise-scale estimate (``Trainer(noise_scale_every=N)``).

Each case trains the mnist1d MLP (40-100-100-10, SGD with momentum 0.9) with the Trainer twice,
once plain and once with the estimate on, and reports the time ratio (with / without), two ways.

1. The headline: interleaved blocks. Two trainers advance in turn by blocks of ``every`` steps
   (so each block of the estimating trainer holds exactly one measured step); the median CPU time
   per step of each is compared. Fine-grained interleaving makes drift on a shared machine hit
   both alike.
2. End to end: whole ``fit(epochs=...)`` calls. The two
   runs of a case are interleaved in an order that alternates per repetition, after one untimed
warm-up of each. Time is measured as the training thread's CPU time (``time.thread_time``; torch
runs on one thread), which other processes on a shared machine disturb far less than wall-clock
time; wall-clock ratios are reported beside it. Reported: the ratio of the median CPU times, and
the median over repetitions of the paired ratio (with min-max), for CPU and wall-clock time.

Cases:

* ``accumulate=4``: the estimate reads the squared gradient norm after the first micro-batch and
  after the whole batch (two fused norms and one device sync per measured step);
* ``accumulate=1``: a measured step is split into two half-batches (two forward/backward passes of
  B/2 instead of one of B), which costs more on a CPU where small batches are overhead-bound;
* ``every=1`` (every step) and ``every=10``.

Run:  .venv/bin/python bench/bench_noise_scale.py [--blocks 100] [--repeats 7] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbbatch  # noqa: E402
from nbbatch import Trainer, data, models  # noqa: E402

CASES = [  # (batch size, accumulate, every)
    (256, 4, 1),
    (256, 4, 10),
    (64, 1, 1),
    (64, 1, 10),
    (64, 1, 50),
    (256, 1, 10),
]


def run(d, batch_size, accumulate, every, epochs) -> tuple[float, float, "Trainer"]:
    """(CPU seconds, wall seconds, trainer) of one ``fit``."""
    torch.manual_seed(0)
    t = Trainer(models.MLP(), (d.x_train, d.y_train), batch_size=batch_size, lr=0.05, optimizer="momentum",
                accumulate=accumulate, noise_scale_every=every, seed=0, device="cpu")
    gc.collect()
    c0, t0 = time.thread_time(), time.perf_counter()
    t.fit(epochs=epochs)
    return time.thread_time() - c0, time.perf_counter() - t0, t


def block_ab(d, batch_size, accumulate, every, blocks) -> tuple[float, float, float, float]:
    """Interleaved A/B in blocks of ``every`` steps (each block holds exactly one measured step).

    Two trainers with the same weights and data, one plain and one with the estimate, advance by
    one block each in turn (the order alternates); each block's training-thread CPU time is kept.
    Returns (median plain us/step, median with-estimate us/step, ratio of medians, median paired ratio).
    """
    def make(e):
        torch.manual_seed(0)
        t = Trainer(models.MLP(), (d.x_train, d.y_train), batch_size=batch_size, lr=0.05, optimizer="momentum",
                    accumulate=accumulate, noise_scale_every=e, seed=0, device="cpu")
        t.fit(steps=every)            # warm-up, untimed
        return t

    plain, noisy = make(None), make(every)
    a, b = [], []
    for i in range(blocks):
        pairs = ((plain, a), (noisy, b)) if i % 2 == 0 else ((noisy, b), (plain, a))
        for t, out in pairs:
            c0 = time.thread_time()
            for _ in range(every):
                t.step()
            out.append((time.thread_time() - c0) / every)
    paired = statistics.median(y / x for x, y in zip(a, b))
    return statistics.median(a) * 1e6, statistics.median(b) * 1e6, statistics.median(b) / statistics.median(a), paired


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=100, help="blocks per contender in the A/B")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 epoch, 20 blocks")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.blocks = 3, 1, 20
    torch.set_num_threads(args.threads)
    d = data.mnist1d()
    print(f"# nbbatch {nbbatch.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
    print(f"# {d.description}; MLP 40-100-100-10; {args.epochs} epochs; {args.repeats} repeats")
    print(f"\n## Interleaved blocks of `every` steps ({args.blocks} blocks per contender; CPU time per step)\n")
    print("| batch | accumulate | every | plain us/step | with estimate us/step | ratio of medians | median paired ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size, accumulate, every in CASES:
        p_us, n_us, ratio, paired = block_ab(d, batch_size, accumulate, every, args.blocks)
        print(f"| {batch_size} | {accumulate} | {every} | {p_us:.0f} | {n_us:.0f} | {ratio:.3f} | {paired:.3f} |", flush=True)
    print(f"\n## End to end: `fit(epochs={args.epochs})`, {args.repeats} repeats\n")
    print("| batch | accumulate | every | steps | plain CPU s | with estimate CPU s | CPU ratio of medians "
          "| paired CPU ratio [min-max] | paired wall ratio [min-max] | b_simple (last) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for batch_size, accumulate, every in CASES:
        run(d, batch_size, accumulate, None, 1)            # warm-up, untimed
        run(d, batch_size, accumulate, every, 1)
        cpu = {None: [], every: []}
        paired_cpu, paired_wall = [], []
        last = None
        for r in range(args.repeats):
            order = (None, every) if r % 2 == 0 else (every, None)
            times = {}
            for e in order:
                c, w, t = run(d, batch_size, accumulate, e, args.epochs)
                times[e] = (c, w)
                cpu[e].append(c)
                if e is not None:
                    last = t
            paired_cpu.append(times[every][0] / times[None][0])
            paired_wall.append(times[every][1] / times[None][1])
        b = [v for v in last.history.steps["b_simple"] if v is not None][-1]
        med_plain, med_noisy = statistics.median(cpu[None]), statistics.median(cpu[every])
        print(f"| {batch_size} | {accumulate} | {every} | {last.step_count} | {med_plain:.4f} | {med_noisy:.4f} | "
              f"{med_noisy / med_plain:.3f} | {statistics.median(paired_cpu):.3f} "
              f"[{min(paired_cpu):.3f}-{max(paired_cpu):.3f}] | {statistics.median(paired_wall):.3f} "
              f"[{min(paired_wall):.3f}-{max(paired_wall):.3f}] | {b:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
