"""Benchmark: the memory tools of ``nbbatch.memory`` on the CPU (and on CUDA when present).

Three measurements, printed as Markdown tables for ``bench/RESULTS.md``:

1. **Finder time.** ``find_max_batch_size`` against byte budgets on the CPU (exact accounting),
   both strategies (grow + bisect, model-guided) side by side with two measurements + the fitted
   memory model (``measure([B1, B2]).fit().max_batch_size``). Reported: the answers, the number of
   trials, median seconds of each, and the ratio of the two strategies.
2. **Accounting overhead.** One accounted training step (``saved_tensors_hooks`` on) against a
   plain ``trainer.step()`` at the same batch size, interleaved; the median ratio.
3. **Throughput curve.** Time per step and examples/s at B = 1 ... 1024 (median over repeats of
   the whole curve, each point itself a median of timed steps), with both knees.

On a CUDA device (``torch.cuda.is_available()``) it also records the figures the CUDA tests check:
predicted vs measured peak at 4x the fitted range, the finder against a denser search, and the
allocated memory after a caught out-of-memory error. Without a device these are reported as not
measured.

Run:  .venv/bin/python bench/bench_memory.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbbatch import Trainer, data, models  # noqa: E402
from nbbatch.memory import account_step, find_max_batch_size, measure  # noqa: E402

MiB = 2**20
OPT = dict(optimizer="momentum", lr=0.05)


def model_factory():
    torch.manual_seed(0)
    return models.MLP(40, (256,) * 8, 10)


def finder_time(d, budgets, repeats):
    rows = []
    for budget in budgets:
        times = {"bisect": [], "model": [], "fit": []}
        answers = set()
        for _ in range(repeats):   # interleaved: both finder strategies, then measure + fit
            model = model_factory()
            found = {}
            for strategy in ("bisect", "model"):
                t0 = time.perf_counter()
                r = find_max_batch_size(model, d, budget=budget, margin=0, strategy=strategy, **OPT)
                times[strategy].append(time.perf_counter() - t0)
                found[strategy] = (r.batch_size, len(r.trials))
            t0 = time.perf_counter()
            predicted = measure(model, d, [32, 64], steps=0, **OPT).fit().max_batch_size(budget)
            times["fit"].append(time.perf_counter() - t0)
            answers.add((found["bisect"], found["model"], predicted))
        ((b_bis, n_bis), (b_mod, n_mod), predicted), = answers   # deterministic: one answer over all repeats
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((budget, b_bis, n_bis, b_mod, n_mod, predicted, med))
    print("\n| budget | B (grow+bisect / model-guided / line) | trials (bisect / guided) | grow+bisect s | "
          "model-guided s | measure+fit s | bisect / guided |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for budget, b_bis, n_bis, b_mod, n_mod, predicted, med in rows:
        print(f"| {budget / MiB:.0f} MiB | {b_bis} / {b_mod} / {predicted} | {n_bis} / {n_mod} | {med['bisect']:.2f} | "
              f"{med['model']:.2f} | {med['fit']:.3f} | {med['bisect'] / med['model']:.1f} |")
    return rows


def accounting_overhead(d, batch_sizes, repeats, steps=5):
    print("\n| batch | plain step ms | accounted step ms | ratio (median of paired) |")
    print("|---:|---:|---:|---:|")
    for B in batch_sizes:
        t = Trainer(model_factory(), d, batch_size=B, seed=0, **OPT)
        t.step()
        plain, acc, ratios = [], [], []
        for _ in range(repeats * steps):
            t0 = time.perf_counter()
            t.step()
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            account_step(t)
            b = time.perf_counter() - t0
            plain.append(a)
            acc.append(b)
            ratios.append(b / a)
        print(f"| {B} | {1e3 * statistics.median(plain):.2f} | {1e3 * statistics.median(acc):.2f} | "
              f"{statistics.median(ratios):.2f} |")


def throughput(d, sizes, repeats, steps):
    curves = [measure(model_factory(), d, sizes, steps=steps, **OPT) for _ in range(repeats)]
    print("\n| batch | ms / step (median) | examples / s | min-max examples / s |")
    print("|---:|---:|---:|---|")
    med_t = []
    for i, B in enumerate(sizes):
        ts = [c.rows[i]["time_per_step"] for c in curves]
        eps = [B / t for t in ts]
        med_t.append(statistics.median(ts))
        print(f"| {B} | {1e3 * med_t[-1]:.2f} | {B / med_t[-1]:.0f} | {min(eps):.0f}-{max(eps):.0f} |")
    from nbbatch.memory import find_knee, fit_step_time
    fit = fit_step_time(sizes, med_t)
    knee_walk = find_knee(sizes, [B / t for B, t in zip(sizes, med_t)])
    print(f"\nknee walking the median curve: B={knee_walk}; fitted line t(B) = {1e3 * fit['overhead']:.2f} ms + "
          f"{1e6 * fit['per_example']:.1f} us x B, knee B = t0/(8c) = {fit['knee']:.1f}; "
          f"knees of the single curves: {[c.knee() for c in curves]} (walk), {[c.knee(method='fit') for c in curves]} (fit)")


def cuda_figures(repeats):
    if not torch.cuda.is_available():
        print("\nCUDA: no device available to this run; the CUDA figures were not measured.")
        return
    dev = torch.device("cuda")
    print(f"\nCUDA: {torch.cuda.get_device_name(dev)}")
    x = torch.randn(4096, 256, device=dev)
    y = torch.randint(0, 10, (4096,), device=dev)
    torch.manual_seed(0)
    model = models.MLP(256, (1024, 1024, 1024), 10)
    fit = measure(model, (x, y), [256, 512, 1024], steps=0, device="cuda", precision="fp32").fit()
    far = measure(model, (x, y), [2048, 4096], steps=0, device="cuda", precision="fp32")
    for row in far.rows:
        err = (fit.predict(row["batch_size"]) - row["total"]) / row["total"]
        print(f"  B={row['batch_size']}: measured {row['total'] / MiB:.1f} MiB, predicted "
              f"{fit.predict(row['batch_size']) / MiB:.1f} MiB ({100 * err:+.1f}%)")
    budget = 512 * MiB
    model = model.cuda()
    t0 = time.perf_counter()
    r = find_max_batch_size(model, (x, y), budget=budget, margin=0, device="cuda", precision="fp32")
    secs = time.perf_counter() - t0
    dense = measure(model, (x, y), sorted({r.batch_size + k * max(1, r.batch_size // 100) for k in range(0, 6)}),
                    steps=0, device="cuda", precision="fp32")
    largest = max(row["batch_size"] for row in dense.rows if row["total"] is not None and row["total"] <= budget)
    print(f"  finder: B={r.batch_size} in {secs:.2f} s ({len(r.trials)} trials); denser search near it: "
          f"largest fitting {largest} ({100 * (largest - r.batch_size) / largest:.2f}% above)")
    free = torch.cuda.mem_get_info()[0]
    big = models.MLP(256, (4096, 4096), 10).cuda()
    torch.nn.functional.cross_entropy(big(x[:8]), y[:8]).backward()   # cuBLAS workspace exists from here on
    big.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    r = find_max_batch_size(big, (x, y), budget=2 * free, margin=0, limit=2**24, device="cuda", precision="fp32")
    torch.cuda.synchronize()
    print(f"  after out-of-memory ({sum(bool(t.get('oom')) for t in r.trials)} OOM trials): allocated "
          f"{torch.cuda.memory_allocated()} bytes, baseline {base} bytes")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer sizes (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    print(f"# nbbatch memory benchmark: torch {torch.__version__}, Python {platform.python_version()}, "
          f"{torch.get_num_threads()} thread(s), {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    d = data.mnist1d()
    finder_time(d, [8 * MiB, 16 * MiB, 64 * MiB] if not args.quick else [16 * MiB], repeats)
    accounting_overhead(d, [32, 1024], repeats)
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] if not args.quick else [1, 8, 64]
    throughput(d, sizes, repeats, steps=7 if not args.quick else 2)
    cuda_figures(repeats)


if __name__ == "__main__":
    main()
