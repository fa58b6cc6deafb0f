"""Benchmark: examples/s of data-parallel training on 1 and 2 CPU processes (gloo), side by side.

One ``nbbatch.launch`` starts two worker processes (process start-up is never timed). Every
repetition runs each contender once, in an order rotated by one place per repetition:

* ``trainer W=1``  ``Trainer(..., distributed=False)`` on rank 0 alone; rank 1 waits in a barrier
                   (its CPU time while waiting is measured and printed: it should be ~0).
* ``trainer W=2``  the data-parallel Trainer over both processes (DDP, gloo): the headline.
* ``hand W=1``     a hand-written loop (seeded permutation, tensor indexing, SGD with momentum).
* ``hand W=2``     the same loop with ``DistributedDataParallel`` and each rank's share of the batch.

Two workloads: ``small`` (the 15k-parameter mnist1d MLP at global batch 128: a step is mostly
fixed cost and communication) and ``wide`` (a 290k-parameter MLP at global batch 1024: a step is
mostly compute). Only the training loop is timed (building the Trainer, DDP and the optimizer is
not); a W=2 time is the slowest rank's (barriers open and close the timed region).

Reported: median seconds, global examples/s, the speed-up of W=2 over W=1 (ratio of medians and
the median of per-repetition ratios), and the Trainer against the hand loop at the same W.
Before timing, the Trainer and the hand loop must reach the same weights at W=2.

Run:  .venv/bin/python bench/bench_distributed.py [--repeats 5] [--quick]
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

import nbbatch  # noqa: E402
from nbbatch import data  # noqa: E402

WORKLOADS = {  # name: (hidden widths, global batch, steps)
    "small": ((100, 100), 128, 150),
    "wide": ((512, 512), 1024, 20),
}
CONTENDERS = [("trainer", 1), ("trainer", 2), ("hand", 1), ("hand", 2)]
LR, MOMENTUM = 0.05, 0.9


def _model(hidden):
    from nbbatch import models
    torch.manual_seed(0)
    return models.MLP(hidden=hidden)


def _hand_run(model, x, y, batch_size, steps, world, rank):
    """A plain loop; at world 2 through DDP on this rank's contiguous share of each global batch.

    Returns the loop as a function: building DDP and the optimizer is not timed.
    """
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nbbatch.batching import epoch_permutation

    net = DDP(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    n = len(x)
    per_epoch = n // batch_size

    def loop():
        epoch, perm = -1, None
        for step in range(steps):
            e, i = divmod(step, per_epoch)
            if e != epoch:
                epoch, perm = e, epoch_permutation(n, 0, e)
            idx = perm[i * batch_size:(i + 1) * batch_size]
            if world > 1:
                idx = idx.tensor_split(world)[rank]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return loop


def _trainer_run(model, x, y, batch_size, steps, world):
    """The Trainer's ``fit``, returned as a function: building the Trainer (and DDP) is not timed."""
    from nbbatch import Trainer
    t = Trainer(model, (x, y), batch_size=batch_size, lr=LR, optimizer="momentum", momentum=MOMENTUM, seed=0,
                drop_last=True, device="cpu", distributed=world > 1)
    return lambda: t.fit(steps=steps)


def worker(bundle, workloads, repeats, check):
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = bundle.x_train, bundle.y_train
    out = {"times": [], "idle_cpu": [], "max_diff": None}
    if check:   # the Trainer and the hand loop compute the same thing at W=2
        hidden, batch, _ = WORKLOADS["small"]
        a, b = _model(hidden), _model(hidden)
        _trainer_run(a, x, y, batch, 40, 2)()
        _hand_run(b, x, y, batch, 40, 2, rank)()
        out["max_diff"] = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    for rep in range(-1, repeats):                    # rep -1: warm-up, not recorded
        order = CONTENDERS[rep % len(CONTENDERS):] + CONTENDERS[:rep % len(CONTENDERS)]
        for name in workloads:
            hidden, batch, steps = WORKLOADS[name]
            for kind, world in order:
                model = _model(hidden)
                if world == 1 and rank != 0:
                    dist.barrier()
                    cpu = time.process_time()
                    dist.barrier()                    # rank 0 trains alone meanwhile
                    out["idle_cpu"].append(time.process_time() - cpu)
                    continue
                if kind == "trainer":
                    train = _trainer_run(model, x, y, batch, steps, world)
                else:
                    train = _hand_run(model, x, y, batch, steps, world, rank)
                dist.barrier()
                t0 = time.perf_counter()
                train()
                if world > 1:
                    dist.barrier()                    # the slowest rank ends the timed region
                dt = time.perf_counter() - t0
                if world == 1:
                    dist.barrier()                    # release rank 1
                if rep >= 0:
                    out["times"].append((rep, name, kind, world, dt, batch * steps))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", default="small,wide")
    parser.add_argument("--quick", action="store_true", help="2 repeats (a smoke run)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {sorted(WORKLOADS)}")
    bundle = data.mnist1d()
    print(f"# torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"1 thread per process, gloo; {repeats} repeats, load average {os.getloadavg()[0]:.1f} at start")
    t0 = time.perf_counter()
    rank0, rank1 = nbbatch.launch(worker, nprocs=2, args=(bundle, workloads, repeats, True), timeout=1800)
    print(f"# wall time {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# check: Trainer vs hand loop at W=2, max |weight difference| after 40 steps = {rank0['max_diff']:.1e}")
    idle = rank1["idle_cpu"]
    print(f"# rank 1 CPU time while rank 0 ran a W=1 contender: median {statistics.median(idle) * 1e3:.1f} ms")
    rows = rank0["times"]
    print(f"\n{'workload':>8} {'contender':>11} {'median s':>9} {'examples/s':>11} {'W=2 / W=1':>10} "
          f"{'paired (min-max)':>18} {'vs hand':>8}")
    for name in workloads:
        med = {}
        for kind, world in CONTENDERS:
            ts = [r[4] for r in rows if r[1] == name and r[2] == kind and r[3] == world]
            med[kind, world] = statistics.median(ts)
        examples = next(r[5] for r in rows if r[1] == name)
        for kind, world in CONTENDERS:
            m = med[kind, world]
            speed, paired = "", ""
            if world == 2:
                speed = f"{med[kind, 1] / m:.2f}x"
                per_rep = [a[4] / b[4] for a in rows for b in rows
                           if a[0] == b[0] and a[1] == b[1] == name and a[2] == b[2] == kind and a[3] == 1 and b[3] == 2]
                paired = f"{statistics.median(per_rep):.2f} ({min(per_rep):.2f}-{max(per_rep):.2f})"
            vs_hand = f"{m / med['hand', world]:.2f}" if kind == "trainer" else ""
            print(f"{name:>8} {kind + ' W=' + str(world):>11} {m:9.3f} {examples / m:11.0f} {speed:>10} "
                  f"{paired:>18} {vs_hand:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
