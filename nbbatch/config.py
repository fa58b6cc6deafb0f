"""The frozen, validated configuration of a training run, each option declared once.

Every field of ``TrainConfig`` is declared with ``option(default, help=..., check=..., live=...)``:
its help text, the check of its value and whether it may change while a run is live. From that
one declaration come the validation in ``__post_init__`` (a bad value fails before a trainer
touches the model, the optimizer or the data), ``RESCHEDULE_OPTIONS`` (the live options), the
``nbbatch train`` command's flags and the panel's choices. Checks that need the data (a batch
larger than the dataset) or the run's length (a warm-up longer than the run) happen in the
Trainer, still before any state changes.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch

from .checks import check_positive_int, is_int
from .device import PRECISIONS
from .losses import LOSSES
from .schedules import DECAYS, SCALE_RULES, WARMUPS, BatchSchedule

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lars", "lamb")

OptimizerSpec = Union[str, Callable[..., Any]]


def check_length(epochs: float | None, steps: int | None) -> None:
    """Raise ValueError unless ``epochs`` and ``steps`` are None or a valid training length (not both).

    Example:
        >>> check_length(2.5, None)
        >>> check_length(None, 0)
        Traceback (most recent call last):
        ...
        ValueError: steps must be a positive int, got 0
    """
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    if epochs is not None and (not _is_number(epochs) or not math.isfinite(epochs) or epochs <= 0):
        raise ValueError(f"epochs must be a number > 0, got {epochs!r}")
    if steps is not None:
        check_positive_int("steps", steps)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------- option declarations
@dataclass(frozen=True)
class Option:
    """What one ``TrainConfig`` field declares about itself (``dataclasses.field`` metadata).

    Attributes:
        name: the field's name (filled in once the class exists).
        help: one or two sentences for the docstring, ``--help`` and the panel.
        check: ``check(name, value)`` raises a ValueError or TypeError naming the option.
        live: True when the option may change while a run is live (``Trainer.reschedule``).
        choices: the names it accepts, where it is a choice of names.
        type: what a command-line value is parsed as (int, float, str or bool), or None for an
            option a command line cannot give (a mapping of callables).
        nargs: how many values the command line takes (None: one).
    """

    help: str
    check: Callable[[str, Any], None]
    live: bool = False
    choices: tuple | None = None
    type: type | None = None
    nargs: int | None = None
    name: str = ""


def option(default, *, help: str, check: Callable[[str, Any], None], live: bool = False,
           choices: tuple | None = None, type: type | None = None, nargs: int | None = None):
    """A ``TrainConfig`` field with its help text, its check and whether it may change live.

    Example:
        >>> from dataclasses import dataclass, fields
        >>> @dataclass
        ... class C:
        ...     n: int = option(1, help="a count", check=_positive_int, type=int)
        >>> fields(C)[0].metadata["option"].help
        'a count'
    """
    spec = Option(help=help, check=check, live=live, choices=choices, type=type, nargs=nargs)
    return dataclasses.field(default=default, metadata={"option": spec})


# The checks: each ``check(name, value)`` raises an error that names the option and the value.
def _check_batch_schedule(name, value):
    """Its form; the sizes are checked against ``batch_size`` with the options that relate two."""
    if value is not None and not isinstance(value, BatchSchedule):
        BatchSchedule.from_spec(value, 1)


def _rule(test: Callable[[Any], bool], must: str, error: type = ValueError, optional: bool = False):
    def check(name, value):
        if not (optional and value is None) and not test(value):
            raise error(f"{name} must {must}, got {value!r}")
    return check


def _interval(low: float, high: float, *, open_low: bool = False, open_high: bool = False, optional: bool = False):
    """``value`` in the interval, written as ``[0, 1)`` in the message."""
    def test(v):
        return _is_number(v) and (low < v if open_low else low <= v) and (v < high if open_high else v <= high)
    text = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return _rule(test, f"lie in {text}", optional=optional)


def _one_of(choices: tuple, also: str = "", callable_ok: bool = False, kind: str = "a name or a callable"):
    """A name out of ``choices`` (or a callable when ``callable_ok``)."""
    def check(name, value):
        if isinstance(value, str) or not callable_ok:
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not known; use one of {choices}{also}")
        elif not callable(value):
            raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return check


_positive_int = _rule(lambda v: is_int(v) and v >= 1, "be a positive int")
_optional_positive_int = _rule(lambda v: is_int(v) and v >= 1, "be a positive int", optional=True)
_finite_nonnegative = _rule(lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "be a finite number >= 0")
_steps_or_none = _rule(lambda v: is_int(v) and v >= 0, "be an int >= 0", optional=True)
_epochs_or_none = _rule(lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "be a number >= 0", optional=True)
_flag = _rule(lambda v: isinstance(v, bool), "be True or False", TypeError)


def _check_betas(name, value):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(_is_number(b) and 0.0 <= b < 1.0 for b in value)):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {value!r}")


def _check_seed(name, value):
    if value is not None and not is_int(value):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")


def _check_device(name, value):
    # the spelling and the availability are checked where the device is resolved (device.py)
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a string or torch.device, got {type(value).__name__} {value!r}")


def _check_metrics(name, value):
    if value is None:
        return
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and callable(v) for k, v in value.items()):
        raise TypeError(f"{name} must be a mapping {{name: callable(output, target)}}")
    if "loss" in value:
        raise ValueError(f"{name} may not be named 'loss': the loss is always recorded")


def _check_segments(name, value):
    if not is_int(value) or value < 0 or value == 1:
        raise ValueError(f"{name} must be 0 (off) or an int >= 2, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the model and the data.

    The options (``Args`` below) are declared once, each with its help text and its check; they
    are validated when the config is built, and ``replace`` validates again.

    Example:
        >>> cfg = TrainConfig(batch_size=1024, lr=0.1, base_batch_size=256, scale_rule="linear")
        >>> cfg.batch_size, cfg.scale_rule
        (1024, 'linear')
    """

    batch_size: int = option(
        64, type=int, check=_positive_int,
        help="Examples per optimizer step (the batch the science is about), across all micro-batches "
             "of an accumulated step.")
    lr: float = option(
        0.1, type=float, live=True, check=_rule(lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
                                                "be a finite number >= 0"),
        help="Learning rate at base_batch_size (the peak after warm-up); scaled by scale_rule.")
    optimizer: OptimizerSpec = option(
        "sgd", type=str, choices=OPTIMIZERS,
        check=_one_of(OPTIMIZERS, " or pass a factory such as torch.optim.RMSprop", callable_ok=True,
                      kind="a name or a callable factory"),
        help="A name (nbbatch.optim; LARS uses trust coefficient 0.001, so its lr is large) or a factory "
             "called as factory(params, lr=lr) (a torch optimizer class or a partial).")
    momentum: float | None = option(
        None, type=float, check=_interval(0.0, 1.0, open_high=True, optional=True),
        help="Momentum of the SGD family and LARS (None: 0 for sgd, 0.9 for the others).")
    weight_decay: float = option(
        0.0, type=float, check=_finite_nonnegative,
        help="L2 penalty (decoupled for adamw and lamb).")
    betas: tuple = option(
        (0.9, 0.999), type=float, nargs=2, check=_check_betas,
        help="Adam/AdamW/LAMB coefficients of the running averages.")
    eps: float | None = option(
        None, type=float,
        check=_rule(lambda v: _is_number(v) and math.isfinite(v) and v > 0,
                    "be a finite number > 0 or None (the optimizer's default)", optional=True),
        help="Adam/AdamW/LAMB epsilon (None: each one's own, 1e-8 for Adam and AdamW as in torch, 1e-6 "
             "for LAMB as in the paper; see nbbatch.optim.LAMB_EPS).")
    adapt_all: bool = option(
        False, type=bool, check=_flag,
        help="For lars and lamb only: False leaves 1-D parameters (biases, norm weights and shifts) out "
             "of the trust ratio and of weight decay, as the large-batch papers' implementations do "
             "(param_groups 'adapted' and '1-d'); True adapts and weight-decays every tensor.")
    scale_rule: str = option(
        "none", type=str, live=True, choices=SCALE_RULES, check=_one_of(SCALE_RULES),
        help="How lr follows batch_size relative to base_batch_size.")
    base_batch_size: int | None = option(
        None, type=int, live=True, check=_optional_positive_int,
        help="The batch size lr was tuned for (None: batch_size).")
    warmup: str = option(
        "none", type=str, live=True, choices=WARMUPS, check=_one_of(WARMUPS),
        help="Warm-up shape ('gradual' is 'linear').")
    warmup_steps: int | None = option(
        None, type=int, live=True, check=_steps_or_none,
        help="Length of the warm-up in optimizer steps (or give warmup_epochs).")
    warmup_epochs: float | None = option(
        None, type=float, live=True, check=_epochs_or_none,
        help="Length of the warm-up in epochs (or give warmup_steps).")
    warmup_start: float | None = option(
        None, type=float, live=True, check=_interval(0.0, 1.0, optional=True),
        help="Fraction of the peak lr at the first step (None: 1/k when the scaling rule multiplied lr "
             "by k > 1, as Goyal et al. start from the unscaled lr, else 0.1).")
    decay: str = option(
        "constant", type=str, live=True, choices=DECAYS, check=_one_of(DECAYS),
        help="lr decay after the warm-up.")
    total_steps: int | None = option(
        None, type=int, live=True, check=_steps_or_none,
        help="Length of the schedule for cosine/linear decay in steps (None: the end of the first fit).")
    total_epochs: float | None = option(
        None, type=float, live=True, check=_epochs_or_none,
        help="Length of the schedule for cosine/linear decay in epochs (None: the end of the first fit).")
    decay_steps: int | None = option(
        None, type=int, live=True, check=_steps_or_none,
        help="Interval of step decay in optimizer steps (or give decay_epochs).")
    decay_epochs: float | None = option(
        None, type=float, live=True, check=_epochs_or_none,
        help="Interval of step decay in epochs (or give decay_steps).")
    decay_gamma: float = option(
        0.1, type=float, live=True, check=_interval(0.0, 1.0, open_low=True),
        help="Factor of each step decay.")
    min_lr_factor: float = option(
        0.0, type=float, live=True, check=_interval(0.0, 1.0),
        help="Floor of cosine/linear decay as a fraction of the peak lr.")
    accumulate: int = option(
        1, type=int, check=_positive_int,
        help="Micro-batches per optimizer step (batch_size is split into this many).")
    batch_schedule: Any = option(
        None, check=_check_batch_schedule,
        help="None (one batch size), or the batch size growing at whole epochs instead of a decaying lr "
             "(Smith et al. 2018): {'epochs': [10, 20], 'factor': 5} multiplies batch_size by 5 at epochs 10 "
             "and 20; a list [(10, 320), (20, 1600)] gives the size from each epoch on; or an "
             "nbbatch.schedules.BatchSchedule. batch_size is the size of epoch 0, and the lr (scaled for "
             "batch_size) does not follow the batch. Epoch lengths (fit(epochs=...), warmup_epochs, "
             "total_epochs) count each epoch's own steps; decay_epochs cannot be combined with it (give "
             "decay_steps).")
    clip_grad_norm: float | None = option(
        None, type=float, check=_rule(lambda v: _is_number(v) and v > 0, "be a number > 0 or None", optional=True),
        help="Clip the global gradient norm to this value (None: no clipping).")
    precision: str = option(
        "auto", type=str, choices=PRECISIONS, check=_one_of(PRECISIONS),
        help="Number format of the forward pass.")
    device: Any = option(
        "auto", type=str, check=_check_device,
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    seed: int | None = option(
        0, type=int, check=_check_seed,
        help="Seeds the weights' draw where the Trainer builds them, the data order and torch's global "
             "generator (dropout); None: unseeded.")
    drop_last: bool = option(
        False, type=bool, check=_flag,
        help="Drop the last, smaller batch of each epoch.")
    loss: Any = option(
        "cross_entropy", type=str, choices=LOSSES, check=_one_of(LOSSES, " or a callable", callable_ok=True),
        help="A name or a callable loss(output, target) returning a batch mean.")
    metrics: Mapping[str, Callable] | None = option(
        None, check=_check_metrics,
        help="{name: fn(output, target) -> batch mean} (None: accuracy for cross-entropy, none otherwise).")
    eval_every: int | None = option(
        None, type=int, check=_optional_positive_int,
        help="Evaluate every this many steps during fit (None: at each epoch's end).")
    eval_batch_size: int = option(
        4096, type=int, check=_positive_int,
        help="Batch size of evaluation passes (memory only: results do not depend on it).")
    data_on_device: bool = option(
        True, type=bool, check=_flag,
        help="Keep in-memory datasets on the training device (False: on the host, pinned, each batch "
             "copied without blocking).")
    grad_noise: float = option(
        0.0, type=float, check=_finite_nonnegative,
        help="eta of gradient-noise injection (Neelakantan et al. 2015): N(0, eta/(1+t)^gamma) is added "
             "to every gradient (after clipping) at step t; 0 turns it off.")
    grad_noise_gamma: float = option(
        0.55, type=float, check=_finite_nonnegative,
        help="gamma of the gradient noise's decay (0.55 in the paper).")
    noise_scale_every: int | None = option(
        None, type=int, check=_optional_positive_int,
        help="Every this many steps, estimate the gradient noise scale from the first micro-batch "
             "against the whole batch (two half-batches when accumulate=1: the same update up to "
             "rounding, except over batch norm, where each half is normalised on its own and the Trainer "
             "warns) and record noise_grad_sq, noise_trace and b_simple (None: off); needs batch_size >= 2. "
             "The estimates carry the finite-population correction 1/B - 1/N (N: the training set; a "
             "DataLoader whose sampler is not torch's shuffling or sequential one uses 1/B); see "
             "OnlineNoiseScale.")
    noise_scale_smoothing: float = option(
        0.9, type=float, check=_interval(0.0, 1.0, open_high=True),
        help="EMA weight of the past for the recorded b_simple.")
    checkpoint_segments: int = option(
        0, type=int, check=_check_segments,
        help="Activation checkpointing of an nn.Sequential model in this many chunks (0: off; see "
             "nbbatch.recompute.CheckpointedSequential).")

    def __post_init__(self):
        for name, check in _CHECKS:
            check(name, getattr(self, name))
        # the checks that relate two options
        if self.accumulate > self.batch_size:
            raise ValueError(f"accumulate={self.accumulate} splits batch_size={self.batch_size} into micro-batches "
                             f"of fewer than one example; use accumulate <= batch_size")
        if self.batch_schedule is not None:
            smallest = min(self.batch_schedule_value.sizes)
            if self.accumulate > smallest:
                raise ValueError(f"accumulate={self.accumulate} splits the batch_schedule's batches of {smallest} into "
                                 f"micro-batches of fewer than one example; use accumulate <= {smallest}")
            if self.decay_epochs is not None:
                raise ValueError(f"decay_epochs={self.decay_epochs!r} with a batch_schedule: its epochs differ in "
                                 f"steps, so an lr decay every few epochs has no fixed step interval; give "
                                 f"decay_steps, or grow the batch instead of decaying the lr")
            if self.noise_scale_every is not None and smallest < 2:
                raise ValueError(f"noise_scale_every={self.noise_scale_every} needs batches of >= 2 examples, but the "
                                 f"batch_schedule has batches of {smallest}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ValueError("optimizer='nesterov' needs momentum > 0")
        if self.adapt_all and self.optimizer not in ("lars", "lamb"):
            raise ValueError(f"adapt_all=True applies to optimizer='lars' or 'lamb' (their trust ratio), "
                             f"got optimizer={self.optimizer!r}")
        for steps_name, epochs_name in _LENGTH_PAIRS:
            if getattr(self, steps_name) is not None and getattr(self, epochs_name) is not None:
                raise ValueError(f"give {steps_name} or {epochs_name}, not both")
        if self.warmup != "none" and self.warmup_steps is None and self.warmup_epochs is None:
            raise ValueError(f"warmup={self.warmup!r} needs a length: set warmup_steps or warmup_epochs")
        if self.decay == "step" and self.decay_steps is None and self.decay_epochs is None:
            raise ValueError("decay='step' needs an interval: set decay_steps or decay_epochs")
        if self.noise_scale_every is not None and self.batch_size < 2:
            raise ValueError(f"noise_scale_every={self.noise_scale_every} compares a smaller batch with the whole "
                             f"one and needs batch_size >= 2, got batch_size={self.batch_size}")

    # ------------------------------------------------------------------ derived values
    @property
    def momentum_value(self) -> float:
        """The momentum actually used: the given value, else 0 for sgd/adam and 0.9 for momentum/nesterov/lars."""
        if self.momentum is not None:
            return float(self.momentum)
        return 0.9 if self.optimizer in ("momentum", "nesterov", "lars") else 0.0

    @property
    def batch_schedule_value(self) -> BatchSchedule | None:
        """``batch_schedule`` as a ``BatchSchedule`` starting at ``batch_size`` (None without one).

        Example:
            >>> TrainConfig(batch_size=32, batch_schedule={"epochs": [5], "factor": 4}).batch_schedule_value(5)
            128
        """
        if self.batch_schedule is None:
            return None
        return BatchSchedule.from_spec(self.batch_schedule, self.batch_size)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed, validated again."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain values only (for checkpoints and logs); callables become ``None`` with their name kept."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "device":
                value = str(value)
            elif f.name == "betas":
                value = [float(b) for b in value]
            elif f.name == "metrics":
                value = None if value is None else sorted(value)
            elif f.name == "batch_schedule" and value is not None:
                value = ({"epochs": list(value["epochs"]), "factor": value["factor"]} if isinstance(value, Mapping)
                         else BatchSchedule.from_spec(value, self.batch_size).to_spec())
            elif callable(value):
                out[f.name + "_name"] = getattr(value, "__name__", type(value).__name__)
                value = None
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides) -> "TrainConfig":
        """Rebuild a config written by ``to_dict``; callables must be passed again in ``overrides``."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        kwargs["betas"] = tuple(kwargs.get("betas", (0.9, 0.999)))
        for name in ("optimizer", "loss"):
            if kwargs.get(name) is None and name not in overrides:
                raise ValueError(f"the checkpoint's {name} was a custom callable "
                                 f"({values.get(name + '_name')!r}); pass {name}=... again when loading")
        if "adapt_all" not in values and kwargs.get("optimizer") in ("lars", "lamb"):
            kwargs["adapt_all"] = True   # written before the option: LARS/LAMB adapted every tensor then
        if values.get("metrics") is not None and "metrics" not in overrides:
            raise ValueError(f"the checkpoint used custom metrics {values['metrics']}; pass metrics=... again when loading")
        kwargs.update(overrides)
        return cls(**kwargs)


_LENGTH_PAIRS = (("warmup_steps", "warmup_epochs"), ("total_steps", "total_epochs"), ("decay_steps", "decay_epochs"))


def _declare(cls) -> dict[str, Option]:
    """Name each field's Option, and write the Args of the class docstring from their help."""
    options = {}
    for f in dataclasses.fields(cls):
        options[f.name] = dataclasses.replace(f.metadata["option"], name=f.name)
    lines = []
    for name, o in options.items():
        text = f"{name}: {o.help}"
        if o.choices:
            text += " One of " + ", ".join(map(repr, o.choices)) + "."
        if o.live:
            text += " May change during a run (``Trainer.reschedule``)."
        lines.append(textwrap.fill(text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 12,
                                   break_on_hyphens=False, break_long_words=False))
    args = "\n".join(lines)
    if cls.__doc__:   # None under python -OO
        cls.__doc__ = cls.__doc__.replace("    Example:", "    Args:\n" + args + "\n\n    Example:", 1)
    return options


OPTIONS: dict[str, Option] = _declare(TrainConfig)
"""Every ``TrainConfig`` option by name, in the order of the fields."""
_CHECKS = tuple((name, o.check) for name, o in OPTIONS.items())
RESCHEDULE_OPTIONS = tuple(name for name, o in OPTIONS.items() if o.live)
"""The options that may change while a run is live (``Trainer.reschedule``): those that shape lr(step)."""
