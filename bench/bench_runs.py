"""Many runs as one: ``MultiRun`` against the same runs trained one after another by ``Trainer``.

Three parts, all in one process, one thread (``torch.set_num_threads(1)`` unless ``--threads``):

1. Throughput. R runs (seeds 0..R-1, momentum SGD, lr 0.05, mnist1d, no evaluation) trained for
   ``--steps`` steps as one ``MultiRun.fit`` and as R ``Trainer.fit`` calls in sequence; the two
   contenders alternate within each repetition (order swapped every repetition), the table gives
   the median times, the ratio of medians and the median paired ratio (min-max).
2. Equivalence. Per optimizer and model: the max relative parameter difference between each run of
   a MultiRun and the same run trained alone by Trainer after 20 steps; and the distribution over
   seeds of the final training loss after a whole run (``--epochs`` epochs) both ways.
3. A sweep like notebook 02's (``sweep(..., lr_factors=(0.5, 1, 2), max_steps=1500,
   max_examples=150_000)``) timed with ``multirun=False`` (one Trainer per run, as before) and
   ``multirun=True``; and with ``seeds=[0, 1, 2]``.

    python bench/bench_runs.py                  # everything (a few minutes on a 2-core machine)
    python bench/bench_runs.py --quick          # smoke run
    python bench/bench_runs.py --part throughput --runs 8,32 --batch-sizes 64
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nbbatch import Trainer, data, models
from nbbatch.diagnostics import sweep
from nbbatch.runs import MultiRun

MODELS = {"mlp": models.MLP, "cnn": models.CNN1d}


def lone(factory, xy, seed, **options):
    torch.manual_seed(seed)
    return Trainer(factory(), xy, seed=seed, device="cpu", **options)


def throughput(xy, kind, batch, R, steps, repeats):
    factory = MODELS[kind]
    opts = dict(lr=0.05, optimizer="momentum", batch_size=batch)

    def multi():
        mr = MultiRun(factory, xy, seed=list(range(R)), device="cpu", **opts)
        t0 = time.perf_counter()
        mr.fit(steps=steps)
        return time.perf_counter() - t0

    def sequence():
        trainers = [lone(factory, xy, r, **opts) for r in range(R)]
        t0 = time.perf_counter()
        for t in trainers:
            t.fit(steps=steps, progress=False)
        return time.perf_counter() - t0

    # The arithmetic floor: one Trainer run whose batch holds all R runs' examples (R * batch rows,
    # the same arithmetic as the R runs, its fixed per-step cost paid once). sequence / big is the
    # most that stacking R runs can gain on this machine.
    x, y = xy
    tiles = -(-R * batch // len(x))
    big_xy = (x.repeat(tiles, *([1] * (x.dim() - 1))), y.repeat(tiles))

    def big():
        t = lone(factory, big_xy, 0, lr=0.05, optimizer="momentum", batch_size=R * batch)
        t0 = time.perf_counter()
        t.fit(steps=steps, progress=False)
        return time.perf_counter() - t0

    multi(), sequence(), big()   # warm-up
    tm, ts, tb, paired = [], [], [], []
    for rep in range(repeats):
        order = [(multi, sequence, big), (sequence, big, multi), (big, multi, sequence)][rep % 3]
        res = {f: f() for f in order}
        tm.append(res[multi])
        ts.append(res[sequence])
        tb.append(res[big])
        paired.append(res[sequence] / res[multi])
    return dict(model=kind, batch=batch, runs=R, steps=steps, seq_s=statistics.median(ts), multi_s=statistics.median(tm),
                big_s=statistics.median(tb), ceiling=statistics.median(ts) / statistics.median(tb),
                ratio=statistics.median(ts) / statistics.median(tm), paired=statistics.median(paired),
                paired_min=min(paired), paired_max=max(paired),
                seq_us_per_run_step=statistics.median(ts) / (R * steps) * 1e6,
                multi_us_per_run_step=statistics.median(tm) / (R * steps) * 1e6)


def max_rel_diff(a, b):
    worst = 0.0
    for x, z in zip(a.state_dict().values(), b.state_dict().values()):
        if x.is_floating_point():
            worst = max(worst, float((x - z).abs().max() / x.abs().max().clamp_min(1e-12)))
    return worst


def equivalence_20_steps(xy, kind, optimizer, R=8):
    factory = MODELS[kind]
    adam = optimizer.startswith("adam")
    lrs = [(1e-3 if adam else 0.05) * (1 + r % 3) for r in range(R)]
    opts = dict(optimizer=optimizer, batch_size=64, weight_decay=1e-4)
    mr = MultiRun(factory, xy, seed=list(range(R)), lr=lrs, device="cpu", **opts)
    mr.fit(steps=20)
    worst = 0.0
    for r in range(R):
        t = lone(factory, xy, r, lr=lrs[r], **opts)
        t.fit(steps=20, progress=False)
        worst = max(worst, max_rel_diff(t.model, mr.model(r)))
    return worst


def whole_run_losses(d, kind, R, epochs):
    factory = MODELS[kind]
    opts = dict(lr=0.05, optimizer="momentum", batch_size=64)
    xy = (d.x_train, d.y_train)
    mr = MultiRun(factory, xy, seed=list(range(R)), device="cpu", **opts)
    mr.fit(epochs=epochs)
    multi = [e["loss"] for e in mr.evaluate("train")]
    alone = []
    for r in range(R):
        t = lone(factory, xy, r, **opts)
        t.fit(epochs=epochs, progress=False)
        alone.append(t.evaluate("train")["loss"])
    return multi, alone


def describe(values):
    return (f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} "
            f"(min {min(values):.4f}, max {max(values):.4f})")


def sweep_times(d, repeats=1, seeds_too=True):
    """Notebook 02's sweep by Trainer (before) and as MultiRuns (after), alternating, ``repeats`` times each."""
    common = dict(target=1.0, lr=0.05, scale_rule="sqrt", lr_factors=(0.5, 1, 2), optimizer="momentum",
                  max_steps=1500, max_examples=150_000, device="cpu")
    sizes = [32, 64, 128, 256, 512, 1024, 2048]
    kinds = {"trainer (before)": dict(multirun=False, seed=0), "multirun (after)": dict(multirun=True, seed=0)}
    times = {name: [] for name in kinds}
    results = {}
    for rep in range(repeats):
        for name in (list(kinds) if rep % 2 == 0 else list(kinds)[::-1]):
            t0 = time.perf_counter()
            results[name] = sweep(models.MLP, d, sizes, **kinds[name], **common)
            times[name].append(time.perf_counter() - t0)
    out = {name: (times[name], results[name]) for name in kinds}
    if seeds_too:
        t0 = time.perf_counter()
        res = sweep(models.MLP, d, sizes, multirun=True, seeds=[0, 1, 2], **common)
        out["multirun, seeds=[0, 1, 2]"] = ([time.perf_counter() - t0], res)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "throughput", "equivalence", "sweep"), default="all")
    p.add_argument("--runs", default="8,32")
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep-repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.steps, a.repeats, a.epochs, a.runs, a.batch_sizes = 5, 1, 0.2, "4", "64"
    d = data.mnist1d()
    xy = (d.x_train, d.y_train)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    if a.part in ("all", "throughput"):
        print("\n| model | batch | R | steps | sequence s | multirun s | ratio of medians | paired ratio (min-max) "
              "| us per run-step seq / multi | one run at batch R x B, s | ceiling (sequence / that) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for kind in a.models.split(","):
            for batch in (int(b) for b in a.batch_sizes.split(",")):
                for R in (int(r) for r in a.runs.split(",")):
                    r = throughput(xy, kind, batch, R, a.steps, a.repeats)
                    print(f"| {kind} | {batch} | {R} | {r['steps']} | {r['seq_s']:.3f} | {r['multi_s']:.3f} | "
                          f"{r['ratio']:.2f}x | {r['paired']:.2f}x ({r['paired_min']:.2f}-{r['paired_max']:.2f}) | "
                          f"{r['seq_us_per_run_step']:.0f} / {r['multi_us_per_run_step']:.0f} | "
                          f"{r['big_s']:.3f} | {r['ceiling']:.2f}x |", flush=True)
    if a.part in ("all", "equivalence"):
        print("\nmax relative parameter difference after 20 steps (8 runs, seeds 0-7, 3 lrs, batch 64):")
        print("| optimizer | " + " | ".join(a.models.split(",")) + " |")
        print("|---|" + "---|" * len(a.models.split(",")))
        for opt in ("sgd", "momentum", "nesterov", "adam", "adamw"):
            cells = [f"{equivalence_20_steps(xy, kind, opt):.1e}" for kind in a.models.split(",")]
            print(f"| {opt} | " + " | ".join(cells) + " |", flush=True)
        R = 4 if a.quick else 8
        print(f"\nfinal training loss after {a.epochs:g} epochs (momentum 0.05, batch 64, seeds 0-{R - 1}):")
        for kind in a.models.split(","):
            multi, alone = whole_run_losses(d, kind, R, a.epochs)
            print(f"  {kind}: multirun {describe(multi)}; trainer {describe(alone)}; "
                  f"max |difference| per seed {max(abs(x - z) for x, z in zip(multi, alone)):.2e}", flush=True)
    if a.part in ("all", "sweep") and not a.quick:
        print("\nsweep like notebook 02's (7 batch sizes x 3 lrs, momentum, target loss 1.0, B_simple measured):")
        out = sweep_times(d, a.sweep_repeats)
        base = statistics.median(out["trainer (before)"][0])
        for name, (secs, res) in out.items():
            steps = [round(r["steps"], 1) for r in res.best]
            spread = "" if "seeds" not in name else " min-max " + ", ".join(
                f"{r['steps_min']}-{r['steps_max']}" for r in res.best)
            extra = "" if res.b_crit_range is None else f", B_crit over seeds {res.b_crit_range[0]:.0f}-{res.b_crit_range[1]:.0f}"
            each = ", ".join(f"{v:.1f}" for v in secs)
            print(f"  {name}: median {statistics.median(secs):.1f} s ({each}; {base / statistics.median(secs):.2f}x), "
                  f"steps {steps}{spread}, B_crit {res.b_crit:.0f}{extra}", flush=True)

if __name__ == "__main__":
    main()
