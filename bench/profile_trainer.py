"""Where the Trainer's extra per-step time goes (mnist1d MLP, CPU, 1 thread).

Three views, all without editing the library (variants are made by replacing methods on one
Trainer instance):

1. Per-step A/B, interleaved step by step: a hand-written step against ``Trainer._guarded_step``
   in full and with the non-finite-gradient guard and/or the History append switched off.
   Median and 10th percentile per step, and the difference to the hand step.
2. In context: the Trainer's own pieces timed inside a real ``fit`` (wrappers add ~0.2 us).
3. In isolation: ``timeit`` of each bookkeeping piece of ``_train_step`` (min of 7).

Run:  .venv/bin/python bench/profile_trainer.py [--steps 3000] [--batch-sizes 32,256]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import timeit

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_trainer as bt  # noqa: E402
from nbbatch import Trainer, data  # noqa: E402
from nbbatch.batching import epoch_permutation  # noqa: E402


def make_trainer(x, y, bs, guard=True, history=True):
    t = Trainer(bt.fresh_model(), (x, y), batch_size=bs, lr=bt.LR, optimizer="momentum", seed=bt.SEED,
                eval_every=None, device="cpu")
    t.fit(steps=1)                       # builds the schedule and the optimizer state
    if not guard:
        t._read_loss_and_check_grads = lambda loss: (loss.item(), True)
    if not history:
        t.history.steps.append = lambda row: None
    return t


def make_hand_step(x, y, bs):
    model = bt.fresh_model()
    opt = bt.make_sgd(model)
    n = len(x)
    steps = math.ceil(n / bs)
    st = {"epoch": 0, "i": 0, "perm": epoch_permutation(n, bt.SEED, 0)}

    def step():
        i = st["i"]
        if i == steps:
            st["epoch"] += 1
            st["i"] = i = 0
            st["perm"] = epoch_permutation(n, bt.SEED, st["epoch"])
        idx = st["perm"][i * bs:(i + 1) * bs]
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        st["i"] = i + 1
    return step


def per_step_ab(x, y, bs, n_steps):
    fns = {
        "hand": make_hand_step(x, y, bs),
        "trainer": make_trainer(x, y, bs)._guarded_step,
        "trainer -guard": make_trainer(x, y, bs, guard=False)._guarded_step,
        "trainer -history": make_trainer(x, y, bs, history=False)._guarded_step,
        "trainer -guard -history": make_trainer(x, y, bs, guard=False, history=False)._guarded_step,
    }
    names = list(fns)
    res = {k: [] for k in names}
    pc = time.perf_counter_ns
    for k in range(n_steps):
        r = k % len(names)
        for name in names[r:] + names[:r]:          # rotate the order every step
            f = fns[name]
            t0 = pc()
            f()
            res[name].append(pc() - t0)
    hm = statistics.median(res["hand"])
    hq = statistics.quantiles(res["hand"], n=10)[0]
    print(f"\n[1] per-step A/B, batch {bs}, {n_steps} interleaved steps each (us per step)")
    print("| variant | median | vs hand | p10 | vs hand |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        m = statistics.median(res[name])
        q = statistics.quantiles(res[name], n=10)[0]
        print(f"| {name} | {m / 1e3:.1f} | {(m - hm) / 1e3:+.1f} | {q / 1e3:.1f} | {(q - hq) / 1e3:+.1f} |")


def in_context(x, y, bs, epochs):
    t = Trainer(bt.fresh_model(), (x, y), batch_size=bs, lr=bt.LR, optimizer="momentum", seed=bt.SEED,
                eval_every=None, device="cpu")
    acc: dict[str, list] = {}
    pc = time.perf_counter_ns

    def wrap(obj, attr, label):
        f = getattr(obj, attr)
        acc[label] = []

        def w(*a, **k):
            t0 = pc()
            r = f(*a, **k)
            acc[label].append(pc() - t0)
            return r
        setattr(obj, attr, w)

    wrap(t, "_train_step", "whole _train_step")
    wrap(t, "_next_batch", "_next_batch (x[idx], y[idx]; hand loop does the same)")
    wrap(t.optimizer, "zero_grad", "optimizer.zero_grad (same in hand loop)")
    wrap(t.optimizer, "step", "optimizer.step (same in hand loop)")
    wrap(t, "_read_loss_and_check_grads", "_read_loss_and_check_grads (Trainer only)")
    wrap(t.history.steps, "append", "history.steps.append (Trainer only)")
    t.fit(epochs=1)
    for v in acc.values():
        v.clear()
    t.fit(epochs=epochs)
    print(f"\n[2] in context, batch {bs}, {epochs} epochs (us per call)")
    print("| piece | median | mean |")
    print("|---|---:|---:|")
    for label, v in acc.items():
        print(f"| {label} | {statistics.median(v) / 1e3:.2f} | {statistics.mean(v) / 1e3:.2f} |")


def isolated(x, y):
    t = make_trainer(x, y, 32)
    xb, yb = x[:32], y[:32]
    loss = F.cross_entropy(t.model(xb), yb)
    loss.backward()
    row = t.history.steps.last()
    sched = t._schedule
    ns = {"t": t, "xb": xb, "loss": loss, "row": row, "sched": sched, "time": time, "torch": torch}
    grads = [p.grad for p in t._params]
    ns["grads"] = grads
    cases = [
        ("_read_loss_and_check_grads(loss) (loss read + whole guard)", "t._read_loss_and_check_grads(loss)"),
        ("  [p.grad for p in params if ...]", "[p.grad for p in t._params if p.grad is not None]"),
        ("  _amp_foreach_non_finite_check_and_unscale_", "torch._amp_foreach_non_finite_check_and_unscale_(grads, t._found_inf, t._one)"),
        ("  _found_inf.item() == 0", "t._found_inf.item() == 0"),
        ("loss.detach()", "loss.detach()"),
        ("loss.item()", "loss.item()"),
        ("schedule(step)", "sched(100)"),
        ("row dict", "{'step': 1, 'epoch': 0.5, 'examples': 3, 'loss': 1.0, 'lr': 0.05, 'batch_size': 32, "
                     "'time': 1.0, 'examples_per_s': 32 / 1e-3, 'peak_memory': None}"),
        ("history Table.append(row)", "t.history.steps.append(row)"),
        ("len(xb)", "len(xb)"),
        ("xb.shape[0]", "xb.shape[0]"),
        ("2 x time.perf_counter()", "time.perf_counter(); time.perf_counter()"),
        ("with nullcontext (autocast fp32)", "with t._autocast: pass"),
    ]
    print("\n[3] in isolation (timeit, us per call, min of 7)")
    print("| piece | us |")
    print("|---|---:|")
    n = 20000
    for label, stmt in cases:
        ts = timeit.repeat(stmt, number=n, repeat=7, globals=ns)
        print(f"| {label} | {min(ts) / n * 1e6:.2f} |")
    t.history.steps.truncate(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="interleaved steps per variant in [1] (default 3000)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the in-context fit in [2] (default 10)")
    p.add_argument("--batch-sizes", default="32,256")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = data.mnist1d()
    x, y = d.x_train, d.y_train
    print(f"machine: {bt.machine_description(torch.get_num_threads())}")
    for bs in [int(s) for s in args.batch_sizes.split(",")]:
        per_step_ab(x, y, bs, args.steps)
        in_context(x, y, bs, args.epochs)
    isolated(x, y)
    return 0


if __name__ == "__main__":
    sys.exit(main())
