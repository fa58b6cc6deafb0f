"""Study: a run interrupted at any step and resumed ends bitwise equal to the run never interrupted.

One reference run (an MLP with dropout 0.1, 200 training examples, batch 16: 13 steps an epoch with a
short last batch of 8, momentum SGD with a warm-up, an evaluation at every epoch end, 3 epochs = 39 steps) is
compared with the same run interrupted at each of several steps and then resumed, in six ways:

* ``callback``  a ``step_end`` callback raises KeyboardInterrupt; ``fit()`` continues;
* ``in-step``   KeyboardInterrupt raised inside the step's forward, after dropout drew its mask;
* ``sigint``    a ``step_end`` callback sends SIGINT to the process (Jupyter's interrupt);
* ``thread``    another thread calls ``request_stop()`` while the step is in flight (the step
                waits for it), then ``fit()`` continues;
* ``ckpt-same`` a ``step_end`` callback saves a checkpoint; ``Trainer.load`` + ``fit()`` in the same process;
* ``ckpt-fresh`` the same checkpoint resumed in a fresh Python process.

"Equal" means every weight and buffer bitwise equal, and every History column that does not
measure wall-clock time (steps: step, epoch, examples, loss, lr, batch_size; evaluations:
step, epoch, examples, eval_loss, eval_accuracy) equal as Python floats.

Run:  .venv/bin/python bench/bench_resume.py [--points 1,2,5,...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading

import torch
import torch.nn as nn

from nbbatch import Trainer

MODES = ("callback", "in-step", "sigint", "thread", "ckpt-same", "ckpt-fresh")
POINTS = (1, 2, 5, 9, 12, 13, 14, 20, 25, 26, 27, 33, 38)   # epoch ends and evaluations at 13 and 26
EPOCHS = 3
STEP_COLUMNS = ("step", "epoch", "examples", "loss", "lr", "batch_size")
EVAL_COLUMNS = ("step", "epoch", "examples", "eval_loss", "eval_accuracy")


class Trip(nn.Module):
    """Identity that raises KeyboardInterrupt in its ``at``-th training forward (once)."""

    def __init__(self):
        super().__init__()
        self.at, self.calls = None, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.at is not None and self.calls == self.at:
                self.at = None
                raise KeyboardInterrupt
        return x


def build(dropout: float = 0.1):
    """(model, trip, data, eval_data): the same every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(260, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)
    torch.manual_seed(1)
    trip = Trip()
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), trip, nn.Linear(32, 3))
    return model, trip, (x[:200], y[:200]), (x[200:], y[200:])


def trainer(model, data, eval_data, device: str = "cpu") -> Trainer:
    return Trainer(model, data, eval_data=eval_data, batch_size=16, lr=0.1, optimizer="momentum",
                   warmup="linear", warmup_steps=5, seed=0, device=device)


def record(t: Trainer) -> dict:
    return {"weights": {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()},
            "steps": {c: t.history.steps[c] for c in STEP_COLUMNS},
            "evals": {c: t.history.evals[c] for c in EVAL_COLUMNS}}


def same(a: dict, b: dict) -> bool:
    return (a["steps"] == b["steps"] and a["evals"] == b["evals"] and a["weights"].keys() == b["weights"].keys()
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]))


def reference(device: str = "cpu") -> dict:
    model, _, data, eval_data = build()
    t = trainer(model, data, eval_data, device)
    t.fit(epochs=EPOCHS)
    return record(t)


def interrupted(mode: str, k: int, workdir: str | None = None, device: str = "cpu") -> dict:
    """The run interrupted at step ``k`` (in-step: inside step ``k``) in ``mode``, then resumed."""
    model, trip, data, eval_data = build()
    t = trainer(model, data, eval_data, device)
    if mode == "in-step":
        trip.at = k
    elif mode in ("callback", "sigint", "thread"):
        asked, done = threading.Event(), threading.Event()

        def stopper():
            asked.wait()
            t.request_stop()
            done.set()

        helper = threading.Thread(target=stopper, daemon=True)
        helper.start()

        def at_k(tr, row):
            if row["step"] != k:
                return
            if mode == "callback":
                raise KeyboardInterrupt
            if mode == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                asked.set()
                done.wait(10)

        t.add_callback("step_end", at_k)
    elif mode in ("ckpt-same", "ckpt-fresh"):
        path = os.path.join(workdir, f"step{k}.pt")
        t.add_callback("step_end", lambda tr, row: tr.save(path) if row["step"] == k else None)
        t.fit(epochs=EPOCHS)
        if mode == "ckpt-same":
            model2, _, data2, eval_data2 = build()
            t2 = Trainer.load(path, model2, data2, eval_data=eval_data2)
            t2.fit()
            return record(t2)
        out = os.path.join(workdir, f"out{k}.pt")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--resume", path, out], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return torch.load(out, weights_only=True)
    else:
        raise ValueError(f"mode={mode!r} is not known; use one of {MODES}")
    try:
        t.fit(epochs=EPOCHS)
    except KeyboardInterrupt:
        pass
    assert t.step_count == (k - 1 if mode == "in-step" else k), (mode, k, t.step_count)
    if mode != "in-step":
        t.remove_callback("step_end", at_k)
    t.fit()
    return record(t)


def resume_in_this_process(path: str, out: str) -> None:
    torch.set_num_threads(1)
    model, _, data, eval_data = build()
    t = Trainer.load(path, model, data, eval_data=eval_data)
    t.fit()
    torch.save(record(t), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(map(str, POINTS)))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--resume", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resume:
        resume_in_this_process(*args.resume)
        return
    torch.set_num_threads(1)
    points = [int(p) for p in args.points.split(",")]
    ref = reference()
    print(f"torch {torch.__version__}, one thread; reference: {len(ref['steps']['step'])} steps, "
          f"evaluations at {ref['evals']['step']}")
    print("| way of interrupting | points | bitwise equal (weights and History) | points that differ |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for mode in args.modes.split(","):
            bad = [k for k in points if not same(interrupted(mode, k, workdir), ref)]
            print(f"| {mode} | {len(points)} | {len(points) - len(bad)} of {len(points)} | {bad or '-'} |", flush=True)


if __name__ == "__main__":
    main()
