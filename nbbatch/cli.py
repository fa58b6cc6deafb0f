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
import dataclasses
import io
import math
import os
import sys

from . import data as datasets
from .config import OPTIONS, TrainConfig
from .diagnostics import sweep as run_sweep
from .models import MODELS, NORMS, make_model
from .trainer import Trainer

# the datasets a command line can build (classification; the IDX loader needs file paths)
DATASETS = ("mnist1d", "digits", "teacher_student")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, and its choices once (in the help text)."""

    def _get_default_metavar_for_optional(self, action):
        return "TEXT" if action.type is None else action.type.__name__.upper()

    def _get_help_string(self, action):
        text = action.help or ""
        if action.choices and "{" not in text:
            text += " (one of: " + ", ".join(map(str, action.choices)) + ")"
        if action.default is None and action.option_strings and not isinstance(action, argparse._HelpAction):
            return text if "(none:" in text else text + " (default: none)"
        return super()._get_help_string(argparse.Namespace(**{**vars(action), "help": text}))


def _choice(parser, *names, choices, default, help):
    parser.add_argument(*names, default=default, choices=choices, metavar="NAME", help=help)


# ``nbbatch train``'s flags for TrainConfig's options are made from the options' declarations
# (config.OPTIONS): one flag per option a command line can give, named after it (--batch-size),
# with its help, its choices and its default; these defaults differ from TrainConfig's.
TRAIN_DEFAULTS = {"lr": 0.05, "optimizer": "momentum"}
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def train_options() -> list[str]:
    """The TrainConfig options ``nbbatch train`` takes as flags (every one a command line can give)."""
    return [name for name, o in OPTIONS.items() if o.type is not None]


def config_options(args: argparse.Namespace) -> dict:
    """The TrainConfig options of parsed ``nbbatch train`` arguments, as keywords of ``Trainer``.

    Example:
        >>> args = build_parser().parse_args(["train", "--warmup", "linear", "--warmup-steps", "20"])
        >>> TrainConfig(**config_options(args)).warmup_steps
        20
    """
    options = {name: getattr(args, name) for name in train_options()}
    options["betas"] = tuple(options["betas"])
    return options


def _parse_bool(text: str) -> bool:
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    try:
        return value[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _option_flag(parser, name: str, *, default=None, help: str | None = None) -> None:
    """The flag ``--name-with-dashes`` of TrainConfig's option ``name``."""
    o = OPTIONS[name]
    kwargs = {"default": _FIELD_DEFAULTS[name] if default is None else default, "help": help or o.help}
    if o.type is bool:   # --drop-last alone means true; --drop-last false also works
        kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
    elif o.choices:
        kwargs.update(choices=o.choices, metavar="NAME")
    else:
        kwargs.update(type=o.type, nargs=o.nargs, metavar=name.upper() if o.type is str else None)
    parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbbatch", description="Batch-size experiments from the command line.",
                                     formatter_class=_Help)
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a reference model and print a per-epoch table", formatter_class=_Help,
                           description="Train a reference model headless and print one row per epoch.")
    _choice(train, "--dataset", choices=DATASETS, default="mnist1d", help="dataset, generated or shipped offline")
    train.add_argument("--num-samples", type=int, default=None, help="mnist1d: total examples generated")
    _choice(train, "--model", choices=MODELS, default="mlp", help="reference model")
    _choice(train, "--norm", choices=NORMS, default="none", help="normalisation layers of the model")
    train.add_argument("--epochs", type=float, default=5, help="passes over the training set (> 0)")
    for name in train_options():
        _option_flag(train, name, default=TRAIN_DEFAULTS.get(name))
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads, >= 1 (none: torch's choice)")
    train.add_argument("--save", metavar="PATH", default=None, help="write a checkpoint to this file at the end")
    train.add_argument("--csv", metavar="PATH", default=None, help="write the per-step history as CSV to this file")
    _add_sweep_parser(sub)
    return parser


# ---------------------------------------------------------------------- argument checks
def _check_number(value, option: str, *, minimum: float = 0.0, integer: bool = False, inclusive: bool = False) -> None:
    if value is None:
        return
    bad = not math.isfinite(value) or (value < minimum if inclusive else value <= minimum)
    if bad:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{option} must be {kind} {'>=' if inclusive else '>'} {minimum:g}, got {value:g}")


def _check_output(path: str | None, option: str) -> None:
    """A file ``path`` can be written: its folder exists and is writable, and it is not a folder."""
    if path is None or path == "":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory; give a file name")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{option} {path!r}: {folder!r} is a file, not a directory")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path!r}: the directory {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path!r}: the directory {folder!r} is not writable")


def check_train_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the option for arguments ``train`` would refuse (before any output)."""
    _check_number(args.epochs, "--epochs")
    _check_number(args.threads, "--threads", minimum=1, integer=True, inclusive=True)
    _check_number(args.num_samples, "--num-samples", minimum=1, integer=True, inclusive=True)
    _check_number(args.lr, "--lr", inclusive=True)
    _check_output(args.save, "--save")
    _check_output(args.csv, "--csv")


def _write(line: str, out) -> None:
    # through tqdm: a progress bar on the same terminal is cleared and redrawn below the line
    from tqdm import tqdm

    tqdm.write(line, file=out)
    out.flush()


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
    sw = sub.add_parser("sweep", help="steps to a target loss per batch size; fit B_crit; measure B_simple",
                        formatter_class=_Help, description="Train to a target at each batch size (best lr of a few), "
                        "fit the critical batch B_crit and measure the noise scale B_simple.")
    _choice(sw, "--dataset", choices=DATASETS, default="mnist1d", help="dataset, generated or shipped offline")
    sw.add_argument("--num-samples", type=int, default=None, help="mnist1d: total examples generated")
    _choice(sw, "--model", choices=MODELS, default="mlp", help="reference model")
    sw.add_argument("--batch-sizes", default="32,64,...,1024", help="comma-separated, or a range 'a,b,...,z'")
    sw.add_argument("--target-loss", type=float, default=1.0, help="target training loss")
    sw.add_argument("--target-accuracy", type=float, default=None, help="target accuracy instead of a loss")
    _choice(sw, "--eval", choices=("train", "test"), default="train", help="where the target is measured")
    sw.add_argument("--lrs", default=None, help="learning-rate grid tried at every batch size, e.g. 0.05,0.1,0.2 "
                    "(none: --lr scaled by --scale-rule, times --lr-factors)")
    sw.add_argument("--lr", type=float, default=0.05, help="lr at the smallest batch size, scaled by --scale-rule")
    _option_flag(sw, "scale_rule", default="sqrt", help="how the lr scales with the batch size")
    sw.add_argument("--lr-factors", default="1,2", help="multipliers of the scaled lr tried per batch size")
    sw.add_argument("--max-steps", type=int, default=1500, help="step budget of each run")
    sw.add_argument("--max-examples", type=int, default=150_000, help="example budget of each run (0: none)")
    _option_flag(sw, "optimizer", default="momentum", help="optimizer")
    sw.add_argument("--no-noise-scale", action="store_true", help="skip measuring B_simple at the target")
    sw.add_argument("--figure", metavar="PATH", default="nbbatch_sweep.png", help="write the figure to this file ('' for none)")
    _option_flag(sw, "seed", help="seed of the weights and the batch order")
    sw.add_argument("--threads", type=int, default=None, help="torch CPU threads, >= 1 (none: torch's choice)")


def check_sweep_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the option for arguments ``sweep`` would refuse (before any output)."""
    _check_number(args.threads, "--threads", minimum=1, integer=True, inclusive=True)
    _check_number(args.num_samples, "--num-samples", minimum=1, integer=True, inclusive=True)
    _check_number(args.max_steps, "--max-steps", minimum=1, integer=True, inclusive=True)
    _check_number(args.max_examples, "--max-examples", integer=True, inclusive=True)
    _check_number(args.lr, "--lr")
    _check_output(args.figure, "--figure")


def sweep(args: argparse.Namespace, out=None) -> int:
    out = sys.stdout if out is None else out
    import torch

    check_sweep_args(args)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    factors = _floats(args.lr_factors, "--lr-factors")
    lrs = _floats(args.lrs, "--lrs") if args.lrs else None
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"num_samples": args.num_samples} if args.num_samples and args.dataset == "mnist1d" else {}
    bundle = datasets.load_dataset(args.dataset, **kwargs)
    target = ("accuracy", args.target_accuracy) if args.target_accuracy is not None else ("loss", args.target_loss)
    lr_options = {"lrs": lrs} if lrs else {"lr": args.lr, "scale_rule": args.scale_rule, "lr_factors": factors}
    budget = f"{args.max_steps} steps" + (f" or {args.max_examples} examples" if args.max_examples else "")
    # The header waits for the first finished run: the sweep checks its arguments first, and an
    # error must come before any output.
    header = [f"# {bundle.description}; model {args.model}; optimizer {args.optimizer}",
              f"# target: {args.eval} {target[0]} {'<=' if target[0] == 'loss' else '>='} {target[1]:g} "
              f"within {budget}",
              f"{'batch':>6} {'lr':>8} {'reached':>7} {'steps':>6} {'examples':>9} {'best':>8}"]

    def progress(run):
        while header:
            _write(header.pop(0), out)
        steps = "-" if run["steps"] is None else str(run["steps"])
        examples = "-" if run["examples"] is None else str(run["examples"])
        flag = "diverged" if run["diverged"] else ("yes" if run["reached"] else "no")
        _write(f"{run['batch_size']:6d} {run['lr']:8.4g} {flag:>7} {steps:>6} {examples:>9} {run['best']:8.4f}", out)

    res = run_sweep(lambda: make_model(args.model, bundle), bundle, batch_sizes, target=target,
                    max_steps=args.max_steps, max_examples=args.max_examples or None, eval_data="test" if args.eval == "test" else None,
                    noise_scale=not args.no_noise_scale, seed=args.seed, optimizer=args.optimizer,
                    progress=progress, **lr_options)
    while header:
        _write(header.pop(0), out)
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


def train(args: argparse.Namespace, out=None) -> int:
    out = sys.stdout if out is None else out
    import torch

    check_train_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = {"num_samples": args.num_samples} if args.num_samples and args.dataset == "mnist1d" else {}
    bundle = datasets.load_dataset(args.dataset, **kwargs)
    model = make_model(args.model, bundle, norm=args.norm)
    trainer = Trainer(model, bundle, **config_options(args))
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
        _write(f"{row['epoch']:5.2f} {row['step']:6d} {train_loss:10.4f} {row['eval_loss']:9.4f} "
               f"{row.get('eval_accuracy', float('nan')):8.4f} {t.history.steps['lr'][-1]:9.4g} {row['time']:8.2f}", out)

    trainer.add_callback("eval_end", on_eval)
    trainer.fit(epochs=args.epochs)
    final = trainer.evaluate()
    print(f"final test accuracy: {final.get('accuracy', float('nan')):.4f}  test loss: {final['loss']:.4f}", file=out)
    if args.save:
        try:
            trainer.save(args.save)
        except OSError as err:   # named by the path asked for, not the temporary file of the atomic write
            raise OSError(f"--save {args.save!r}: cannot write the checkpoint ({err.strerror or err})") from None
        print(f"checkpoint written to {args.save}", file=out)
    if args.csv and trainer.is_main_process:
        try:
            trainer.history.to_csv(args.csv)
        except OSError as err:
            raise OSError(f"--csv {args.csv!r}: cannot write the history ({err.strerror or err})") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = parser.parse_args(argv)
    commands = {"train": train, "sweep": sweep}
    if args.command not in commands:
        parser.print_help()
        return 1
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, OSError) as err:   # bad arguments, unreadable data, unwritable files
        print(f"nbbatch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
