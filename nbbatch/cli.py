"""The ``nbbatch`` command: headless training runs from a terminal.

    nbbatch train --dataset mnist1d --batch-size 64 --epochs 5

prints one row per epoch and the final test accuracy. With no arguments it trains the MLP on
mnist1d on the CPU for a few epochs.

    nbbatch sweep --dataset mnist1d --batch-sizes 32,64,...,1024 --target-loss 1.0

trains to the target at each batch size (best lr of a few per batch size), prints the table,
the critical batch B_crit from the fit S = S_min + E_min/B and the noise scale B_simple at the
target, and writes the figure.
"""

from __future__ import annotations

import argparse
import io
import sys

from .config import OPTIMIZERS
from .device import PRECISIONS
from .schedules import DECAYS, SCALE_RULES, WARMUPS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbbatch", description="Batch-size experiments from the command line.")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a reference model and print a per-epoch table")
    train.add_argument("--dataset", default="mnist1d", help="mnist1d, digits or teacher_student (default mnist1d)")
    train.add_argument("--num-samples", type=int, default=None, help="mnist1d: total examples generated")
    train.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    train.add_argument("--norm", default="none", choices=("none", "batch", "group", "layer"))
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--epochs", type=float, default=5)
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--optimizer", default="momentum", choices=OPTIMIZERS)
    train.add_argument("--momentum", type=float, default=None)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--scale-rule", default="none", choices=SCALE_RULES)
    train.add_argument("--base-batch-size", type=int, default=None)
    train.add_argument("--warmup", default="none", choices=WARMUPS)
    train.add_argument("--warmup-epochs", type=float, default=None)
    train.add_argument("--decay", default="constant", choices=DECAYS)
    train.add_argument("--accumulate", type=int, default=1)
    train.add_argument("--clip-grad-norm", type=float, default=None)
    train.add_argument("--precision", default="auto", choices=PRECISIONS)
    train.add_argument("--device", default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--save", default=None, help="write a checkpoint here at the end")
    train.add_argument("--csv", default=None, help="write the per-step history as CSV here")
    _add_sweep_parser(sub)
    return parser


# ---------------------------------------------------------------------- nbbatch sweep
def parse_batch_sizes(text: str) -> list[int]:
    """``"16,64,256"`` or a doubling range ``"16,32,...,4096"`` (the ratio of the first two terms).

    Example:
        >>> parse_batch_sizes("16,32,...,256")
        [16, 32, 64, 128, 256]
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if "..." in parts:
        i = parts.index("...")
        if i < 2 or i != len(parts) - 2:
            raise ValueError(f"--batch-sizes {text!r}: write a range as 'a,b,...,z' (ratio b/a up to z)")
        head = [_positive_int(p, text) for p in parts[:i]]
        last = _positive_int(parts[-1], text)
        ratio = head[1] / head[0]
        if ratio <= 1:
            raise ValueError(f"--batch-sizes {text!r}: a range needs increasing first terms")
        out = list(head)
        while round(out[-1] * ratio) <= last:
            out.append(int(round(out[-1] * ratio)))
        return out
    return [_positive_int(p, text) for p in parts]


def _positive_int(part: str, text: str) -> int:
    try:
        value = int(part)
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: {part!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"--batch-sizes {text!r}: {value} is not a positive batch size")
    return value


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{name} {text!r}: give comma-separated numbers") from None


def _add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="steps to a target loss per batch size; fit B_crit; measure B_simple")
    sw.add_argument("--dataset", default="mnist1d", help="mnist1d, digits or teacher_student (default mnist1d)")
    sw.add_argument("--num-samples", type=int, default=None, help="mnist1d: total examples generated")
    sw.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    sw.add_argument("--batch-sizes", default="32,64,...,1024",
                    help="comma-separated, or a range 'a,b,...,z' (default 32,64,...,1024)")
    sw.add_argument("--target-loss", type=float, default=1.0, help="target training loss (default 1.0)")
    sw.add_argument("--target-accuracy", type=float, default=None, help="target accuracy instead of a loss")
    sw.add_argument("--eval", default="train", choices=("train", "test"), help="where the target is measured")
    sw.add_argument("--lrs", default=None, help="learning-rate grid tried at every batch size, e.g. 0.05,0.1,0.2")
    sw.add_argument("--lr", type=float, default=0.05, help="lr at the smallest batch size, scaled by --scale-rule")
    sw.add_argument("--scale-rule", default="sqrt", choices=SCALE_RULES)
    sw.add_argument("--lr-factors", default="1,2", help="multipliers of the scaled lr tried per batch size")
    sw.add_argument("--max-steps", type=int, default=1500, help="step budget of each run")
    sw.add_argument("--max-examples", type=int, default=150_000,
                    help="example budget of each run (default 150000; 0: none)")
    sw.add_argument("--optimizer", default="momentum", choices=OPTIMIZERS)
    sw.add_argument("--no-noise-scale", action="store_true", help="skip measuring B_simple at the target")
    sw.add_argument("--figure", default="nbbatch_sweep.png", help="write the figure here ('' for none)")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def sweep(args: argparse.Namespace, out=sys.stdout) -> int:
    import torch

    from . import data as datasets
    from .diagnostics import sweep as run_sweep
    from .models import make_model

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    factors = _floats(args.lr_factors, "--lr-factors")
    lrs = _floats(args.lrs, "--lrs") if args.lrs else None
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"num_samples": args.num_samples} if args.num_samples and args.dataset == "mnist1d" else {}
    bundle = datasets.load_dataset(args.dataset, **kwargs)
    target = ("accuracy", args.target_accuracy) if args.target_accuracy is not None else ("loss", args.target_loss)
    lr_options = {"lrs": lrs} if lrs else {"lr": args.lr, "scale_rule": args.scale_rule, "lr_factors": factors}
    print(f"# {bundle.description}; model {args.model}; optimizer {args.optimizer}", file=out)
    budget = f"{args.max_steps} steps" + (f" or {args.max_examples} examples" if args.max_examples else "")
    print(f"# target: {args.eval} {target[0]} {'<=' if target[0] == 'loss' else '>='} {target[1]:g} "
          f"within {budget}", file=out)
    print(f"{'batch':>6} {'lr':>8} {'reached':>7} {'steps':>6} {'examples':>9} {'best':>8}", file=out, flush=True)

    def progress(run):
        steps = "-" if run["steps"] is None else str(run["steps"])
        examples = "-" if run["examples"] is None else str(run["examples"])
        flag = "diverged" if run["diverged"] else ("yes" if run["reached"] else "no")
        print(f"{run['batch_size']:6d} {run['lr']:8.4g} {flag:>7} {steps:>6} {examples:>9} {run['best']:8.4f}",
              file=out, flush=True)

    res = run_sweep(lambda: make_model(args.model, bundle), bundle, batch_sizes, target=target,
                    max_steps=args.max_steps, max_examples=args.max_examples or None, eval_data="test" if args.eval == "test" else None,
                    noise_scale=not args.no_noise_scale, seed=args.seed, optimizer=args.optimizer,
                    progress=progress, **lr_options)
    print("\nbest learning rate per batch size:", file=out)
    print(f"{'batch':>6} {'lr':>8} {'steps':>6} {'examples':>9} {'B_simple':>9}", file=out)
    for r in res.best:
        steps = str(r["steps"]) if r["reached"] else f"not reached (best {r['best']:.4f})"
        examples = str(r["examples"]) if r["reached"] else ""
        b = "" if r["b_simple"] is None else f"{r['b_simple']:.0f}"
        print(f"{r['batch_size']:6d} {r['lr']:8.4g} {steps:>6} {examples:>9} {b:>9}", file=out)
    if res.fit is not None:
        f = res.fit
        print(f"fit S = S_min + E_min/B: S_min = {f.s_min:.1f} steps, E_min = {f.e_min:.0f} examples, "
              f"B_crit = E_min/S_min = {f.b_crit:.0f}", file=out)
    else:
        print("B_crit: not fitted (fewer than two batch sizes reached the target)", file=out)
    if res.b_simple is not None:
        print(f"B_simple at the target (median over batch sizes): {res.b_simple:.0f}", file=out)
    if args.figure:
        fig = res.plot()
        fig.savefig(args.figure, dpi=100)
        print(f"figure written to {args.figure}", file=out)
    return 0


def train(args: argparse.Namespace, out=sys.stdout) -> int:
    import torch

    from . import data as datasets
    from .models import make_model
    from .trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = {"num_samples": args.num_samples} if args.num_samples and args.dataset == "mnist1d" else {}
    bundle = datasets.load_dataset(args.dataset, **kwargs)
    model = make_model(args.model, bundle, norm=args.norm)
    trainer = Trainer(model, bundle, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      momentum=args.momentum, weight_decay=args.weight_decay, scale_rule=args.scale_rule,
                      base_batch_size=args.base_batch_size, warmup=args.warmup, warmup_epochs=args.warmup_epochs,
                      decay=args.decay, accumulate=args.accumulate, clip_grad_norm=args.clip_grad_norm,
                      precision=args.precision, device=args.device, seed=args.seed)
    if not trainer.is_main_process:   # data-parallel under torchrun: rank 0 prints and writes
        out = io.StringIO()
    print(f"# {bundle.description}", file=out)
    print(f"# {trainer!r}", file=out)
    print(f"{'epoch':>5} {'steps':>6} {'train_loss':>10} {'test_loss':>9} {'test_acc':>8} {'lr':>9} {'seconds':>8}", file=out)
    start = {"step": 0}

    def on_eval(t, row):
        losses = t.history.steps["loss"][start["step"]:]
        start["step"] = t.step_count
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        print(f"{row['epoch']:5.2f} {row['step']:6d} {train_loss:10.4f} {row['eval_loss']:9.4f} "
              f"{row.get('eval_accuracy', float('nan')):8.4f} {t.history.steps['lr'][-1]:9.4g} {row['time']:8.2f}",
              file=out, flush=True)

    trainer.add_callback("eval_end", on_eval)
    trainer.fit(epochs=args.epochs)
    final = trainer.evaluate()
    print(f"final test accuracy: {final.get('accuracy', float('nan')):.4f}  test loss: {final['loss']:.4f}", file=out)
    if args.save:
        trainer.save(args.save)
        print(f"checkpoint written to {args.save}", file=out)
    if args.csv and trainer.is_main_process:
        trainer.history.to_csv(args.csv)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            return train(args)
        except (ValueError, TypeError) as err:
            print(f"nbbatch: error: {err}", file=sys.stderr)
            return 2
    if args.command == "sweep":
        try:
            return sweep(args)
        except (ValueError, TypeError) as err:
            print(f"nbbatch: error: {err}", file=sys.stderr)
            return 2
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
