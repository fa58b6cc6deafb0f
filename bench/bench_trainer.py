"""Benchmark: ``nbbatch.Trainer.fit`` against a hand-written PyTorch loop, a DataLoader loop
and (when importable) PyTorch Lightning, on the mnist1d MLP on the CPU.

All contenders run in one process, interleaved: every repetition runs each contender once, in
an order rotated by one place per repetition, so drift on a shared machine hits all of them
alike. Each contender is warmed up once (untimed) before timing. Times are medians.

Contenders (same model architecture and initialisation, same data, same optimizer
``torch.optim.SGD(lr=0.05, momentum=0.9)``, same epochs and batch size):

* ``hand``          hand-written loop: per-epoch permutation (``epoch_permutation``, i.e. a
                    seeded ``torch.randperm``), tensor indexing, ``zero_grad(set_to_none=True)``,
                    ``F.cross_entropy``, no evaluation, no per-step ``.item()``.
* ``trainer``       ``Trainer(model, (x, y), ...)``: tensors only, so no evaluation; History
                    recording on (one row per step, loss via ``.item()``). The headline.
* ``dataloader``    ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`` loop.
* ``hand+eval``     the hand loop plus the Trainer's end-of-epoch evaluation on the test split
                    (eval mode, no_grad, loss + accuracy, one ``.tolist()``).
* ``trainer+eval``  ``Trainer(model, DataBundle, ...)``: evaluates at each epoch end.
* ``lightning``     ``lightning.Trainer(max_epochs, accelerator='cpu', logger=False, ...)`` with a
                    DataLoader (shuffle=True); skipped with a note when lightning is not importable.

The ``*+eval`` rows are compared with ``hand+eval`` (like with like); all others with ``hand``.

Before timing it checks correctness: the Trainer and the hand loop, with the same seed, initial
weights and permutations, must end with the same weights (max abs difference reported).

Run:  .venv/bin/python bench/bench_trainer.py [--repeats 7] [--epochs 5] [--batch-sizes 32,256] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbbatch  # noqa: E402
from nbbatch import Trainer, data, models  # noqa: E402
from nbbatch.batching import epoch_permutation  # noqa: E402

LR, MOMENTUM, SEED = 0.05, 0.9, 0


# ---------------------------------------------------------------------- helpers
def fresh_model() -> torch.nn.Module:
    """The same initial weights for every contender: seed, then build."""
    torch.manual_seed(SEED)
    return models.MLP()


def make_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


@torch.no_grad()
def evaluate_like_trainer(model, x, y, batch_size=4096):
    """What Trainer does at each epoch end: eval mode, loss + accuracy, one sync at the end."""
    model.eval()
    totals, count = None, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        out = model(xb)
        row = torch.stack([F.cross_entropy(out, yb), (out.argmax(-1) == yb).float().mean()]) * len(xb)
        totals = row if totals is None else totals + row
        count += len(xb)
    means = (totals / count).tolist()
    model.train()
    return means


def hand_loop(model, x, y, batch_size, epochs, eval_xy=None):
    """The hand-written reference loop. Returns the last step's loss (one .item() at the end)."""
    opt = make_sgd(model)
    n = len(x)
    steps = math.ceil(n / batch_size)
    model.train()
    loss = None
    for epoch in range(epochs):
        perm = epoch_permutation(n, SEED, epoch)   # a seeded torch.randperm, as the Trainer draws it
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
        if eval_xy is not None:
            evaluate_like_trainer(model, *eval_xy)
    return loss.item()


def dataloader_loop(model, x, y, batch_size, epochs):
    opt = make_sgd(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model.train()
    loss = None
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
    return loss.item()


def import_lightning():
    try:
        import lightning as L  # noqa: N812
        return L, None
    except Exception as err:  # ImportError, or a broken install
        try:
            import pytorch_lightning as L  # noqa: N812
            return L, None
        except Exception:
            return None, f"{type(err).__name__}: {err}"


def make_lightning_runner(L):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    class LitMLP(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.cross_entropy(self.model(xb), yb)

        def configure_optimizers(self):
            return make_sgd(self.model)

    def run(model, x, y, batch_size, epochs):
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        t0 = time.perf_counter()
        trainer.fit(LitMLP(model), train_dataloaders=loader)
        return time.perf_counter() - t0   # fit only (the Trainer object is built outside)

    return run


# ---------------------------------------------------------------------- contenders
def build_contenders(d, lightning_run):
    x, y = d.x_train, d.y_train
    eval_xy = (d.x_test, d.y_test)

    def timed(fn):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def c_hand(bs, epochs):
        model = fresh_model()
        return timed(lambda: hand_loop(model, x, y, bs, epochs))

    def c_hand_eval(bs, epochs):
        model = fresh_model()
        return timed(lambda: hand_loop(model, x, y, bs, epochs, eval_xy=eval_xy))

    def c_trainer(bs, epochs):
        t = Trainer(fresh_model(), (x, y), batch_size=bs, lr=LR, optimizer="momentum", seed=SEED,
                    eval_every=None, device="cpu")
        dt = timed(lambda: t.fit(epochs=epochs))
        assert len(t.history.steps) == epochs * t.steps_per_epoch   # History recording was on
        return dt

    def c_trainer_eval(bs, epochs):
        t = Trainer(fresh_model(), d, batch_size=bs, lr=LR, optimizer="momentum", seed=SEED,
                    eval_every=None, device="cpu")
        dt = timed(lambda: t.fit(epochs=epochs))
        assert len(t.history.evals) == epochs
        return dt

    def c_dataloader(bs, epochs):
        model = fresh_model()
        torch.manual_seed(SEED)   # the DataLoader's shuffle draws from the global generator
        return timed(lambda: dataloader_loop(model, x, y, bs, epochs))

    contenders = {
        "hand": ("hand", c_hand),
        "trainer": ("hand", c_trainer),
        "dataloader": ("hand", c_dataloader),
        "hand+eval": ("hand+eval", c_hand_eval),
        "trainer+eval": ("hand+eval", c_trainer_eval),
    }
    if lightning_run is not None:
        def c_lightning(bs, epochs):
            model = fresh_model()
            torch.manual_seed(SEED)
            gc.collect()
            return lightning_run(model, x, y, bs, epochs)
        contenders["lightning"] = ("hand", c_lightning)
    return contenders


# ---------------------------------------------------------------------- correctness
def check_same_result(d, bs, epochs):
    """Trainer vs hand loop with the same init and permutations: final loss and weights."""
    x, y = d.x_train, d.y_train
    t = Trainer(fresh_model(), (x, y), batch_size=bs, lr=LR, optimizer="momentum", seed=SEED,
                eval_every=None, device="cpu")
    t.fit(epochs=epochs)
    model = fresh_model()
    hand_loss = hand_loop(model, x, y, bs, epochs)
    trainer_loss = t.history.steps["loss"][-1]
    w_t, w_h = t.model.state_dict(), model.state_dict()
    max_diff = max((w_t[k] - w_h[k]).abs().max().item() for k in w_h)
    return trainer_loss, hand_loss, max_diff


# ---------------------------------------------------------------------- main
def bootstrap_ratio_interval(a, b, n_boot=2000, level=0.90, seed=0):
    """Percentile bootstrap interval of median(a) / median(b) (repeats resampled in pairs)."""
    import random
    rng = random.Random(seed)
    k = len(a)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(k) for _ in range(k)]
        ratios.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * n_boot)], ratios[min(n_boot - 1, int((1 - tail) * n_boot))]


def machine_description(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, nbbatch {nbbatch.__version__}, torch threads {threads}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per contender (default 7)")
    p.add_argument("--epochs", type=float, default=5, help="epochs per run (default 5)")
    p.add_argument("--batch-sizes", default="32,256", help="comma-separated batch sizes (default 32,256)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--no-lightning", action="store_true", help="skip Lightning even when importable")
    p.add_argument("--quick", action="store_true", help="short smoke run: 3 repeats of 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs = min(args.repeats, 3), 1
    epochs = int(args.epochs)
    if epochs != args.epochs or epochs < 1:
        p.error("--epochs must be a positive whole number")
    batch_sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    if args.repeats < 1 or not batch_sizes:
        p.error("--repeats must be >= 1 and --batch-sizes non-empty")

    torch.set_num_threads(args.threads)
    d = data.mnist1d()
    n = len(d.x_train)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {machine_description(torch.get_num_threads())}")
    print(f"workload: mnist1d MLP 40-100-100-10, {n} train / {len(d.x_test)} test examples, "
          f"SGD lr={LR} momentum={MOMENTUM}, {epochs} epochs, batch sizes {batch_sizes}, "
          f"{args.repeats} interleaved repeats (median)")

    lightning_run, lightning_note = None, None
    if args.no_lightning:
        lightning_note = "Lightning skipped (--no-lightning)"
    else:
        L, err = import_lightning()
        if L is None:
            lightning_note = f"Lightning not importable, skipped ({err})"
        else:
            lightning_run = make_lightning_runner(L)
            lightning_note = f"Lightning {L.__version__} measured (fit() wall time, its setup included)"
    print(lightning_note)

    # correctness, side by side
    print("\ncorrectness (same seed, init and epoch permutations):")
    for bs in batch_sizes:
        lt, lh, diff = check_same_result(d, bs, epochs)
        verdict = "identical" if diff == 0 else ("within roundoff" if diff < 1e-5 else "DIFFERENT")
        print(f"  batch {bs}: final loss trainer {lt:.6f} / hand {lh:.6f}; "
              f"max |w_trainer - w_hand| = {diff:.3g} ({verdict})")

    contenders = build_contenders(d, lightning_run)
    names = list(contenders)
    for bs in batch_sizes:        # warm-up, untimed
        for name in names:
            contenders[name][1](bs, epochs)

    times = {(name, bs): [] for name in names for bs in batch_sizes}
    t_start = time.perf_counter()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]   # round-robin rotation
        for bs in batch_sizes:
            for name in order:
                times[name, bs].append(contenders[name][1](bs, epochs))
    elapsed = time.perf_counter() - t_start

    print(f"\ntimed in {elapsed:.1f} s. ratio = median / median of its baseline (the headline); "
          f"paired = median over repeats of run / baseline run of the same repeat [min-max]; "
          f"min ratio = best run / best baseline run (least disturbed by other load)\n")
    print("| contender | baseline | batch | steps | median s | ratio | paired ratio [min-max] | min ratio "
          "| us/step | extra us/step |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for bs in batch_sizes:
        steps = epochs * math.ceil(n / bs)
        for name in names:
            base = contenders[name][0]
            ts, tb = times[name, bs], times[base, bs]
            med, medb = statistics.median(ts), statistics.median(tb)
            paired = [a / b for a, b in zip(ts, tb)]
            print(f"| {name} | {base} | {bs} | {steps} | {med:.4f} | {med / medb:.3f} | "
                  f"{statistics.median(paired):.3f} [{min(paired):.2f}-{max(paired):.2f}] | "
                  f"{min(ts) / min(tb):.3f} | {med / steps * 1e6:.1f} | {(med - medb) / steps * 1e6:+.1f} |")

    print("\ngoal: trainer <= 1.05x hand loop, History recording on "
          "(90% bootstrap interval of the ratio of medians in brackets):")
    for bs in batch_sizes:
        th, tt = times["hand", bs], times["trainer", bs]
        ratio = statistics.median(tt) / statistics.median(th)
        lo, hi = bootstrap_ratio_interval(tt, th)
        if hi <= 1.05:
            verdict = "met"
        elif lo > 1.05:
            verdict = "NOT met"
        else:
            verdict = ("met by the median, but " if ratio <= 1.05 else "NOT met by the median, but ") + \
                "inconclusive: the interval straddles 1.05 (noise; use more --repeats or bench/profile_trainer.py)"
        print(f"  batch {bs}: {ratio:.3f}x [{lo:.3f}-{hi:.3f}] -> {verdict}")
    if args.quick:
        print("  (--quick is a smoke run: far too short and noisy for a verdict on 1.05x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
