"""Learning-rate schedules as pure, closed-form functions of the optimizer step, and batch-size
schedules as pure functions of the epoch.

A schedule is warm-up (none / linear "gradual" / constant, Goyal et al. 2017) followed by a
decay (constant / cosine / step / linear). ``lr(step)`` depends on nothing but its arguments,
so a resumed run gets exactly the learning rates of an uninterrupted one and the values can be
tested against tables. ``Schedule.lambda_lr`` hands the same function to torch's ``LambdaLR``
for users who drive their own loop.

``BatchSchedule`` raises the batch size at epoch milestones instead of decaying the learning rate
(Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size"):
multiplying B by k at an epoch shrinks SGD's noise scale lr*N/B as dividing lr by k does, with
k times fewer optimizer steps in every later epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from .checks import is_int

import torch

from .checks import check_positive_int

WARMUPS = ("none", "linear", "gradual", "constant")
DECAYS = ("constant", "cosine", "step", "linear")
SCALE_RULES = ("none", "linear", "sqrt")


def scale_lr(lr: float, batch_size: int, base_batch_size: int, rule: str = "linear") -> float:
    """Scale a learning rate tuned at ``base_batch_size`` to ``batch_size``.

    ``"linear"``: lr * B/B0 (Goyal et al. 2017); ``"sqrt"``: lr * sqrt(B/B0) (Hoffer et al. 2017);
    ``"none"``: lr unchanged.

    Args:
        lr: the learning rate that works at ``base_batch_size``.
        batch_size: examples per optimizer step of the new run.
        base_batch_size: the batch size ``lr`` was tuned for.
        rule: ``"none"``, ``"linear"`` or ``"sqrt"``.

    Example:
        >>> scale_lr(0.1, 1024, 256, "linear"), scale_lr(0.1, 1024, 256, "sqrt")
        (0.4, 0.2)
    """
    if rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={rule!r} is not known; use one of {SCALE_RULES}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("base_batch_size", base_batch_size)
    k = batch_size / base_batch_size
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    return lr


def length_in_steps(steps: int | None, epochs: float | None, steps_per_epoch: int) -> int | None:
    """A length given as ``steps`` or ``epochs`` in optimizer steps; None when neither is given.

    Epochs round to the nearest step, and a length of more than zero epochs is at least one
    step (``TrainConfig`` and ``fit`` check that at most one of the two is given).

    Example:
        >>> length_in_steps(None, 2.5, 40), length_in_steps(None, 0.001, 40), length_in_steps(7, None, 40)
        (100, 1, 7)
    """
    if steps is not None:
        return steps
    if epochs is not None:
        return max(int(round(epochs * steps_per_epoch)), 1 if epochs > 0 else 0)
    return None


def check_warmup_fits(warmup_steps: int, run_steps: int | None) -> None:
    """Raise ValueError when a warm-up of ``warmup_steps`` is longer than a run of ``run_steps``.

    Example:
        >>> check_warmup_fits(10, 4)
        Traceback (most recent call last):
        ...
        ValueError: the warm-up (10 steps) is longer than the run (4 steps); shorten warmup_steps/warmup_epochs or train longer
    """
    if run_steps is not None and warmup_steps > run_steps:
        raise ValueError(f"the warm-up ({warmup_steps} steps) is longer than the run ({run_steps} steps); "
                         f"shorten warmup_steps/warmup_epochs or train longer")


def warmup_factor(step: int, kind: str, warmup_steps: int, start: float) -> float:
    """Multiplier of the peak learning rate at ``step`` during warm-up (1.0 once it is over).

    ``"linear"``/``"gradual"``: from ``start`` at step 0 rising by equal amounts to 1.0 at
    ``warmup_steps``; ``"constant"``: ``start`` for the first ``warmup_steps`` steps, then 1.0.

    Example:
        >>> [warmup_factor(s, "linear", 4, 0.2) for s in range(6)]
        [0.2, 0.4, 0.6000000000000001, 0.8, 1.0, 1.0]
    """
    if kind == "none" or step >= warmup_steps:
        return 1.0
    if kind in ("linear", "gradual"):
        return start + (1.0 - start) * step / warmup_steps
    if kind == "constant":
        return start
    raise ValueError(f"warmup={kind!r} is not known; use one of {WARMUPS}")


def decay_factor(step: int, kind: str, *, warmup_steps: int = 0, total_steps: int | None = None,
                 decay_steps: int | None = None, decay_gamma: float = 0.1, min_lr_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` after warm-up.

    ``"cosine"`` and ``"linear"`` fall from 1 at ``warmup_steps`` to ``min_lr_factor`` at
    ``total_steps`` and stay there; ``"step"`` multiplies by ``decay_gamma`` every ``decay_steps`` steps,
    counted from step 0 (Goyal et al. divide at fixed epochs); ``"constant"`` is 1.

    Example:
        >>> [round(decay_factor(s, "cosine", total_steps=4), 3) for s in range(5)]
        [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if kind == "constant":
        return 1.0
    if kind == "step":
        return decay_gamma ** (step // decay_steps)
    if kind in ("cosine", "linear"):
        span = total_steps - warmup_steps
        progress = min(max(step - warmup_steps, 0) / span, 1.0) if span > 0 else 1.0
        if kind == "cosine":
            return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - min_lr_factor) * progress
    raise ValueError(f"decay={kind!r} is not known; use one of {DECAYS}")


@dataclass(frozen=True)
class Schedule:
    """A complete learning-rate schedule in optimizer steps; ``schedule(step)`` is the lr.

    Args:
        peak_lr: the learning rate after warm-up (already scaled for the batch size).
        warmup: ``"none"``, ``"linear"`` (alias ``"gradual"``) or ``"constant"``.
        warmup_steps: length of the warm-up in optimizer steps.
        warmup_start: fraction of ``peak_lr`` at step 0 of the warm-up.
        decay: ``"constant"``, ``"cosine"``, ``"step"`` or ``"linear"``.
        total_steps: where cosine/linear decay reach ``min_lr_factor`` (required for them).
        decay_steps: steps between two ``"step"`` decays (required for it).
        decay_gamma: factor of each ``"step"`` decay.
        min_lr_factor: floor of cosine/linear decay, as a fraction of ``peak_lr``.

    The names are ``TrainConfig``'s, whose epochs-or-steps options ``length_in_steps`` turns
    into these steps.

    Example:
        >>> s = Schedule(0.4, warmup="linear", warmup_steps=4, warmup_start=0.25,
        ...              decay="linear", total_steps=8)
        >>> [round(s(t), 3) for t in range(9)]
        [0.1, 0.175, 0.25, 0.325, 0.4, 0.3, 0.2, 0.1, 0.0]
    """

    peak_lr: float
    warmup: str = "none"
    warmup_steps: int = 0
    warmup_start: float = 0.1
    decay: str = "constant"
    total_steps: int | None = None
    decay_steps: int | None = None
    decay_gamma: float = 0.1
    min_lr_factor: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.peak_lr, (int, float)) and math.isfinite(self.peak_lr) and self.peak_lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.peak_lr!r}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup={self.warmup!r} is not known; use one of {WARMUPS}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r} is not known; use one of {DECAYS}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.warmup != "none" and self.warmup_steps == 0:
            raise ValueError(f"warmup={self.warmup!r} needs a length: set warmup_steps (or warmup_epochs) > 0")
        if not 0.0 <= self.warmup_start <= 1.0:
            raise ValueError(f"warmup_start must lie in [0, 1], got {self.warmup_start!r}")
        if self.decay in ("cosine", "linear"):
            if self.total_steps is None:
                raise ValueError(f"decay={self.decay!r} needs total_steps (the length of the run)")
        if self.total_steps is not None:
            if not isinstance(self.total_steps, int) or self.total_steps < 1:
                raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
            if self.warmup != "none":
                check_warmup_fits(self.warmup_steps, self.total_steps)
        if self.decay == "step" and (not isinstance(self.decay_steps, int) or self.decay_steps < 1):
            raise ValueError(f"decay='step' needs decay_steps as a positive number of steps, got {self.decay_steps!r}")
        if not 0.0 < self.decay_gamma <= 1.0:
            raise ValueError(f"decay_gamma must lie in (0, 1], got {self.decay_gamma!r}")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"min_lr_factor must lie in [0, 1], got {self.min_lr_factor!r}")

    def factor(self, step: int) -> float:
        """The multiplier of ``peak_lr`` at ``step``."""
        if step < self.warmup_steps and self.warmup != "none":
            return warmup_factor(step, self.warmup, self.warmup_steps, self.warmup_start)
        return decay_factor(step, self.decay, warmup_steps=self.warmup_steps if self.warmup != "none" else 0,
                            total_steps=self.total_steps, decay_steps=self.decay_steps,
                            decay_gamma=self.decay_gamma, min_lr_factor=self.min_lr_factor)

    def __call__(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def values(self, steps: int) -> list[float]:
        """The learning rates of steps ``0 .. steps-1`` (for plots and tables)."""
        return [self(s) for s in range(steps)]

    def lambda_lr(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The same schedule as torch's ``LambdaLR`` (the optimizer's lr must be ``peak_lr``)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)


@dataclass(frozen=True)
class BatchSchedule:
    """The batch size as a function of the epoch: ``batch_size`` until the first milestone, then
    the size each milestone names from its epoch on.

    The milestones are whole epochs, so the batch size is constant within an epoch and an epoch
    of ``n`` examples at batch size B has ``ceil(n / B)`` steps (``n // B`` with ``drop_last``).

    Args:
        batch_size: the batch size of epoch 0.
        milestones: ``((epoch, batch_size), ...)``: from ``epoch`` (an int >= 1, increasing) on,
            batches hold ``batch_size`` examples.

    Example:
        >>> s = BatchSchedule.step(32, epochs=[2, 4], factor=5)
        >>> [s(e) for e in range(6)]
        [32, 32, 160, 160, 800, 800]
        >>> [s.epoch_steps(e, n=1000) for e in range(6)]
        [32, 32, 7, 7, 2, 2]
        >>> s.steps(6, n=1000), s.steps(2.5, n=1000)
        (82, 68)
    """

    batch_size: int
    milestones: tuple = ()

    def __post_init__(self):
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_schedule: the first batch size must be a positive int, got {self.batch_size!r}")
        try:
            pairs = tuple(tuple(m) for m in self.milestones)
        except TypeError:
            raise ValueError(f"batch_schedule: milestones must be (epoch, batch_size) pairs, "
                             f"got {self.milestones!r}") from None
        last = 0
        for pair in pairs:
            if len(pair) != 2 or not all(is_int(v) for v in pair):
                raise ValueError(f"batch_schedule: each milestone is an (epoch, batch_size) pair of ints, got {pair!r}")
            epoch, size = pair
            if epoch <= last:
                raise ValueError(f"batch_schedule: milestone epochs must be ints >= 1 in increasing order "
                                 f"(epoch 0 runs at batch_size), got {[p[0] for p in pairs]}")
            if size < 1:
                raise ValueError(f"batch_schedule: the batch size from epoch {epoch} must be a positive int, got {size!r}")
            last = epoch
        object.__setattr__(self, "milestones", pairs)

    @classmethod
    def step(cls, batch_size: int, epochs, factor: int) -> "BatchSchedule":
        """Multiply the batch size by ``factor`` at each of ``epochs`` (the mirror of lr step decay).

        Example:
            >>> BatchSchedule.step(10, epochs=[3, 6], factor=2).milestones
            ((3, 20), (6, 40))
        """
        if not is_int(factor) or factor < 2:
            raise ValueError(f"batch_schedule: factor must be an int >= 2, got {factor!r}")
        if isinstance(epochs, (str, bytes)) or not hasattr(epochs, "__iter__"):
            raise ValueError(f"batch_schedule: epochs must be a list of ints, got {epochs!r}")
        epochs = list(epochs)
        if not epochs:
            raise ValueError("batch_schedule: epochs is empty; give the epochs at which the batch grows")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_schedule: the first batch size must be a positive int, got {batch_size!r}")
        return cls(batch_size, tuple((e, batch_size * factor ** (i + 1)) for i, e in enumerate(epochs)))

    @classmethod
    def from_spec(cls, spec, batch_size: int) -> "BatchSchedule":
        """A schedule from ``TrainConfig.batch_schedule``'s forms, starting at ``batch_size``.

        ``spec`` is a BatchSchedule (starting at ``batch_size``), ``{"epochs": [...], "factor": k}``
        (see ``step``) or a list of ``(epoch, batch_size)`` milestones.

        Example:
            >>> BatchSchedule.from_spec([(2, 64), (5, 256)], 16)(5)
            256
            >>> BatchSchedule.from_spec({"epochs": [1], "factor": 4}, 16)(1)
            64
        """
        if isinstance(spec, BatchSchedule):
            if spec.batch_size != batch_size:
                raise ValueError(f"batch_schedule starts at batch size {spec.batch_size} but batch_size={batch_size}; "
                                 f"they must agree")
            return spec
        if isinstance(spec, Mapping):
            if set(spec) != {"epochs", "factor"}:
                raise ValueError(f"batch_schedule: a dict needs exactly the keys 'epochs' and 'factor', e.g. "
                                 f"{{'epochs': [10, 20], 'factor': 5}}, got keys {sorted(map(str, spec))}")
            return cls.step(batch_size, spec["epochs"], spec["factor"])
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError("batch_schedule: the list of (epoch, batch_size) milestones is empty; use None "
                                 "for a constant batch size")
            return cls(batch_size, tuple(spec))
        raise ValueError(f"batch_schedule must be None, a BatchSchedule, {{'epochs': [...], 'factor': k}} or a list "
                         f"of (epoch, batch_size) pairs, got {type(spec).__name__} {spec!r}"[:300])

    def to_spec(self) -> list:
        """The milestones as plain lists (for configs written to checkpoints and logs)."""
        return [list(m) for m in self.milestones]

    def __call__(self, epoch: int) -> int:
        size = self.batch_size
        for start, b in self.milestones:
            if epoch < start:
                break
            size = b
        return size

    @property
    def sizes(self) -> tuple:
        """Every batch size the schedule uses, in order of first use."""
        out = [self.batch_size]
        for _, b in self.milestones:
            if b not in out:
                out.append(b)
        return tuple(out)

    def epoch_steps(self, epoch: int, n: int, drop_last: bool = False) -> int:
        """Optimizer steps in ``epoch`` of ``n`` examples."""
        b = self(epoch)
        return n // b if drop_last else -(-n // b)

    def steps(self, epochs: float, n: int, drop_last: bool = False) -> int:
        """Optimizer steps from the start of training to ``epochs`` epochs (a fraction of an epoch
        counts that share of its steps, rounded)."""
        whole = int(math.floor(epochs))
        total = sum(self.epoch_steps(e, n, drop_last) for e in range(whole))
        return total + int(round((epochs - whole) * self.epoch_steps(whole, n, drop_last)))

    def noise_factor(self, epoch: int) -> float:
        """``batch_size / B(epoch)``: the factor by which the schedule has shrunk SGD's noise scale
        lr*N/B, equal to the lr factor of the step decay it replaces.

        Example:
            >>> s = BatchSchedule.step(32, epochs=[2], factor=4)
            >>> s.noise_factor(2), decay_factor(2, "step", decay_steps=2, decay_gamma=0.25)
            (0.25, 0.25)
        """
        return self.batch_size / self(epoch)
