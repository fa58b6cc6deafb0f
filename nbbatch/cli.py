"""The ``nbbatch`` command: headless training runs from a terminal.

    nbbatch train --dataset mnist1d --batch-size 64 --epochs 5

prints one row per epoch and the final test accuracy. With no arguments it trains the MLP on
mnist1d on the CPU for a few epochs.
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
    return parser


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
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
