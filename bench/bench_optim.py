"""Benchmark: the cost of LARS and LAMB, of gradient-noise injection and of DistanceFromInit.

Ratios measured side by side in one process, interleaved (each repetition runs every contender
once, in an order rotated by one place per repetition), medians over repetitions:

* ``optimizer.step()`` alone, on the gradients of one real batch: LARS against
  ``torch.optim.SGD(momentum=0.9)`` and LAMB against ``torch.optim.Adam`` (torch's defaults, which
  use its multi-tensor ``foreach`` kernels); for two model sizes.
* a whole Trainer step (``fit`` over a number of steps): ``grad_noise=0.01`` and a
  ``DistanceFromInit`` recorder against the plain Trainer (SGD with momentum);
  ``optimizer="lars"`` against it, and ``optimizer="lamb"`` against ``optimizer="adam"``.

Run:  .venv/bin/python bench/bench_optim.py [--repeats 7] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbbatch import Trainer, data, models  # noqa: E402
from nbbatch.geometry import DistanceFromInit  # noqa: E402
from nbbatch.optim import LAMB, LARS  # noqa: E402


def interleaved(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each contender per repetition; order rotated each repetition."""
    names = list(contenders)
    for fn in contenders.values():      # warm-up, untimed
        fn()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], baseline: dict[str, str], per: int, unit: str) -> None:
    print(f"{'contender':<28}{'median us/' + unit:>16}{'ratio':>8}{'paired ratio (min-max)':>28}")
    for name, ts in times.items():
        med = statistics.median(ts)
        base = baseline.get(name)
        if base is None:
            print(f"{name:<28}{1e6 * med / per:>16.1f}{'1':>8}")
            continue
        paired = [a / b for a, b in zip(ts, times[base])]
        print(f"{name:<28}{1e6 * med / per:>16.1f}{med / statistics.median(times[base]):>8.2f}"
              f"{statistics.median(paired):>12.2f} ({min(paired):.2f}-{max(paired):.2f})")


def optimizer_steps(hidden, repeats: int, steps: int) -> None:
    d = data.mnist1d()
    torch.manual_seed(0)
    model = models.MLP(hidden=hidden)
    x, y = d.x_train[:256], d.y_train[:256]
    F.cross_entropy(model(x), y).backward()
    n = sum(p.numel() for p in model.parameters())
    builders = {
        "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
        "LARS": lambda ps: LARS(ps, lr=0.01, momentum=0.9),
        "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "LAMB": lambda ps: LAMB(ps, lr=1e-3),
    }
    contenders = {}
    for name, build in builders.items():
        m = copy.deepcopy(model)
        for p, q in zip(m.parameters(), model.parameters()):
            p.grad = q.grad.clone()
        opt = build(list(m.parameters()))

        def run(opt=opt):
            for _ in range(steps):
                opt.step()
        contenders[name] = run
    print(f"\noptimizer.step() alone, MLP hidden={hidden} ({n} parameters, {len(list(model.parameters()))} tensors), "
          f"{steps} steps x {repeats} repeats")
    report(interleaved(contenders, repeats), {"LARS": "SGD momentum", "LAMB": "Adam"}, steps, "step")


def trainer_steps(repeats: int, steps: int, batch: int) -> None:
    d = data.mnist1d()
    torch.manual_seed(0)
    model0 = models.MLP()

    def make(**options):
        options = {"optimizer": "momentum", "lr": 0.05, **options}

        def run():
            t = Trainer(copy.deepcopy(model0), (d.x_train, d.y_train), batch_size=batch, seed=0, device="cpu",
                        **options)
            t.fit(steps=steps)
        return run

    def with_distance():
        t = Trainer(copy.deepcopy(model0), (d.x_train, d.y_train), batch_size=batch, lr=0.05,
                    optimizer="momentum", seed=0, device="cpu")
        DistanceFromInit(t)
        t.fit(steps=steps)

    contenders = {"Trainer": make(), "Trainer + grad_noise": make(grad_noise=0.01),
                  "Trainer + DistanceFromInit": with_distance, "Trainer, lars": make(optimizer="lars", lr=5.0),
                  "Trainer, adam": make(optimizer="adam", lr=1e-3), "Trainer, lamb": make(optimizer="lamb", lr=0.01)}
    print(f"\nTrainer.fit (mnist1d MLP, batch {batch}, SGD momentum), {steps} steps x {repeats} repeats "
          f"(includes building the Trainer)")
    report(interleaved(contenders, repeats), {"Trainer + grad_noise": "Trainer", "Trainer + DistanceFromInit": "Trainer",
                                              "Trainer, lars": "Trainer", "Trainer, lamb": "Trainer, adam"},
           steps, "step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 repeats of few steps (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    optimizer_steps((100, 100), repeats, 50 if args.quick else 500)
    optimizer_steps((1000, 1000), repeats, 10 if args.quick else 100)
    trainer_steps(repeats, 50 if args.quick else 400, 64)


if __name__ == "__main__":
    main()
