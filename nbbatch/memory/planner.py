"""The effective-batch planner: :func:`plan` turns a batch size and a memory budget into
micro-batch, accumulation, learning rate and warm-up (a :class:`Plan`, run by ``Trainer.from_plan``).

The vocabulary is ``TrainConfig``'s: ``batch_size`` (the effective batch, all devices together),
``lr`` (tuned at ``base_batch_size``), ``scale_rule``; the scaled lr is ``peak_lr``, as on the Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import check_positive_int
from ..config import TrainConfig
from ..schedules import SCALE_RULES, scale_lr
from .measurement import MemoryReport
from .model import MemoryModel, check_budget, mib

__all__ = ["Plan", "plan"]

GOYAL_WARMUP_EPOCHS = 5.0   # Goyal et al. 2017's gradual warm-up when the lr is scaled up


@dataclass(frozen=True)
class Plan:
    """An effective-batch plan: per-device micro-batches, accumulation, learning rate, warm-up.

    ``batch_size = world_size * accumulate * micro_batch`` (the last micro-batch of a step may
    be smaller when the split is uneven). ``lr`` is the lr tuned at ``base_batch_size``;
    ``peak_lr`` is it scaled by ``scale_rule`` to ``batch_size``. Apply the plan with
    ``Trainer.from_plan`` or ``to_config``.
    """

    batch_size: int
    world_size: int
    per_device_batch: int
    micro_batch: int
    accumulate: int
    max_micro_batch: int
    lr: float
    base_batch_size: int
    scale_rule: str
    peak_lr: float
    warmup_epochs: float
    predicted_bytes: float | None
    budget: int | None

    def to_config(self, config=None, **options):
        """A ``TrainConfig`` (per device) that runs this plan; ``options`` override other fields.

        Its ``lr`` is the plan's ``peak_lr`` (already scaled: ``scale_rule="none"``).
        """
        k = self.peak_lr / self.lr if self.lr > 0 else 1.0
        fields = dict(batch_size=self.per_device_batch, accumulate=self.accumulate, lr=self.peak_lr,
                      scale_rule="none", base_batch_size=None)
        if self.warmup_epochs > 0:
            fields.update(warmup="linear", warmup_epochs=self.warmup_epochs, warmup_steps=None,
                          warmup_start=min(1.0, 1.0 / k) if k > 1 else None)
        fields.update(options)
        return TrainConfig(**fields) if config is None else config.replace(**fields)

    def summary(self) -> str:
        lines = [f"effective batch {self.batch_size} = {self.world_size} device(s) x {self.accumulate} "
                 f"micro-batch(es) of {self.micro_batch}"
                 + (f" (memory allows up to {self.max_micro_batch})" if self.budget is not None else ""),
                 f"lr {self.peak_lr:.4g} ({self.scale_rule} scaling of {self.lr:.4g} at batch {self.base_batch_size})",
                 f"warm-up: {'linear over ' + format(self.warmup_epochs, 'g') + ' epochs' if self.warmup_epochs else 'none'}"]
        if self.predicted_bytes is not None:
            lines.append(f"predicted step memory {mib(self.predicted_bytes):.2f} MiB of a "
                         f"{mib(self.budget):.2f} MiB budget")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def plan(batch_size: int, budget=None, *, memory: MemoryModel | MemoryReport | None = None, world_size: int = 1,
         lr: float = 0.1, base_batch_size: int | None = None, scale_rule: str = "linear",
         warmup_epochs: float | None = None, max_micro_batch: int | None = None, round_to=None) -> Plan:
    """Plan an effective batch: the micro-batch memory allows, accumulation steps, lr and warm-up.

    The micro-batch is the largest that fits ``budget`` by ``memory`` (a :class:`MemoryModel`)
    or ``max_micro_batch``; accumulation is the fewest micro-batches per device reaching the
    per-device batch. The lr follows ``scale_rule`` (``"linear"``, Goyal et al. 2017; ``"sqrt"``,
    Hoffer et al. 2017; ``"none"``). Warm-up: when the lr grows by k > 1, a linear warm-up from
    the base lr over 5 epochs (Goyal et al.'s gradual warm-up), unless ``warmup_epochs`` is given.

    Args:
        batch_size: the effective batch (examples per optimizer step, all devices together).
        budget: bytes per device (needs ``memory``).
        memory: the fitted memory model (or the ``MemoryReport`` to fit it from).
        world_size: data-parallel devices (``batch_size`` must divide evenly among them).
        lr, base_batch_size: the lr tuned at batch ``base_batch_size`` (default ``batch_size``),
            as in ``TrainConfig``.
        scale_rule: the lr scaling rule, as in ``TrainConfig``.
        warmup_epochs: override the warm-up suggestion.
        max_micro_batch: cap the micro-batch directly (with or without a budget).
        round_to: round the memory limit down to a multiple of 8 or a power of two.

    Example:
        >>> m = MemoryModel.fit([32, 64], [1_000_000 + 32 * 10_000, 1_000_000 + 64 * 10_000])
        >>> p = plan(1024, budget=2_000_000, memory=m, lr=0.1, base_batch_size=256)
        >>> p.micro_batch, p.accumulate, round(p.peak_lr, 3), p.warmup_epochs
        (94, 11, 0.4, 5.0)
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("world_size", world_size)
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} does not divide among world_size={world_size} devices")
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={scale_rule!r} is not known; use one of {SCALE_RULES}")
    base_batch_size = batch_size if base_batch_size is None else check_positive_int("base_batch_size", base_batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if warmup_epochs is not None and (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float))
                                      or warmup_epochs < 0):
        raise ValueError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    if isinstance(memory, MemoryReport):
        memory = memory.fit()
    if memory is not None and not isinstance(memory, MemoryModel):
        raise TypeError(f"memory must be a MemoryModel or a MemoryReport, got {type(memory).__name__}")
    per_device = batch_size // world_size
    cap = per_device
    predicted = None
    if budget is not None:
        if memory is None:
            raise ValueError("budget: give memory=MemoryModel (from measure(...).fit()) to turn a budget into a batch")
        cap = min(cap, memory.max_batch_size(budget, round_to=round_to))
    elif memory is not None:
        raise ValueError("memory: give budget=... (bytes per device) with the memory model")
    if max_micro_batch is not None:
        cap = min(cap, check_positive_int("max_micro_batch", max_micro_batch))
    accumulate = math.ceil(per_device / cap)
    micro = math.ceil(per_device / accumulate)
    if memory is not None:
        predicted = memory.predict(micro)
    peak_lr = scale_lr(lr, batch_size, base_batch_size, scale_rule)
    k = peak_lr / lr if lr > 0 else 1.0
    warm = float(warmup_epochs) if warmup_epochs is not None else (GOYAL_WARMUP_EPOCHS if k > 1 else 0.0)
    return Plan(batch_size, world_size, per_device, micro, accumulate, cap, float(lr), base_batch_size, scale_rule,
                peak_lr, warm, predicted, None if budget is None else check_budget(budget))
