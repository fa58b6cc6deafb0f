"""The frozen, validated configuration of a training run.

Every field is checked in ``__post_init__`` so a bad value fails before a trainer touches the
model, the optimizer or the data. Checks that need the data (a batch larger than the dataset)
or the run's length (a warm-up longer than the run) happen in the Trainer, still before any
state changes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from .checks import is_int
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
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                               or not math.isfinite(epochs) or epochs <= 0):
        raise ValueError(f"epochs must be a number > 0, got {epochs!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the model and the data.

    Args:
        batch_size: examples per optimizer step (the batch the science is about), across all
            micro-batches of an accumulated step.
        lr: learning rate at ``base_batch_size`` (the peak after warm-up); scaled by ``scale_rule``.
        optimizer: ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``, ``"adamw"``, ``"lars"``,
            ``"lamb"`` (``nbbatch.optim``; LARS uses trust coefficient 0.001, so its lr is large), or a
            factory called as ``factory(params, lr=lr)`` (a torch optimizer class or a partial).
        momentum: momentum of the SGD family and LARS (default 0 for ``"sgd"``, 0.9 for the others).
        weight_decay: L2 penalty (decoupled for ``"adamw"`` and ``"lamb"``).
        betas, eps: Adam/AdamW/LAMB hyperparameters. ``eps=None`` (default) takes each one's own
            value: 1e-8 for Adam and AdamW (torch's), 1e-6 for LAMB (the paper's and its reference
            implementations'; see ``nbbatch.optim.LAMB_EPS``).
        adapt_all: for ``optimizer="lars"``/``"lamb"``: False (default) leaves 1-D parameters
            (biases, norm weights and shifts) out of the trust ratio and out of weight decay, as the
            large-batch papers' implementations do (``nbbatch.optim.layerwise_groups``; the
            Trainer's ``optimizer.param_groups`` are named ``"adapted"`` and ``"1-d"``); True adapts
            and weight-decays every tensor. Only these two optimizers take it.
        scale_rule: ``"none"``, ``"linear"`` or ``"sqrt"``: how ``lr`` follows ``batch_size``
            relative to ``base_batch_size``.
        base_batch_size: the batch size ``lr`` was tuned for (defaults to ``batch_size``).
        warmup: ``"none"``, ``"linear"`` (alias ``"gradual"``) or ``"constant"``.
        warmup_steps / warmup_epochs: length of the warm-up (give one).
        warmup_start: fraction of the peak lr at the first step; default 1/k when the scaling
            rule multiplied lr by k > 1 (Goyal et al. start from the unscaled lr), else 0.1.
        decay: ``"constant"``, ``"cosine"``, ``"step"`` or ``"linear"``.
        total_steps / total_epochs: length of the schedule for cosine/linear decay; defaults to
            the end of the first ``fit``.
        decay_steps / decay_epochs: interval of ``"step"`` decay; ``decay_gamma`` its factor.
        min_lr_factor: floor of cosine/linear decay as a fraction of the peak lr.
        accumulate: micro-batches per optimizer step (``batch_size`` is split into this many).
        batch_schedule: None (one batch size), or the batch size growing at whole epochs instead of
            a decaying lr (Smith et al. 2018): ``{"epochs": [10, 20], "factor": 5}`` multiplies
            ``batch_size`` by 5 at epochs 10 and 20; a list ``[(10, 320), (20, 1600)]`` gives the
            size from each epoch on; or an ``nbbatch.schedules.BatchSchedule``. ``batch_size`` is the
            size of epoch 0, and the lr (scaled for ``batch_size``) does not follow the batch.
            Epoch lengths (``fit(epochs=...)``, ``warmup_epochs``, ``total_epochs``) count each
            epoch's own steps; ``decay_epochs`` cannot be combined with it (give ``decay_steps``).
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        seed: seeds the data order and torch's global generator (dropout); None: unseeded.
        drop_last: drop the last, smaller batch of each epoch.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``loss(output, target)`` returning a
            batch mean.
        metrics: ``{name: fn(output, target) -> batch mean}``; default accuracy for
            cross-entropy, none otherwise.
        eval_every: evaluate every this many steps during ``fit`` (None: at each epoch's end).
        eval_batch_size: batch size of evaluation passes (memory only, results do not depend on it).
        data_on_device: keep in-memory datasets on the training device (False: keep them on
            the host, pinned, and copy each batch without blocking).
        grad_noise: eta of gradient-noise injection (Neelakantan et al. 2015): N(0, eta/(1+t)^gamma)
            is added to every gradient (after clipping) at step t; 0 (default) turns it off.
        grad_noise_gamma: gamma of that decay (0.55 in the paper).
        noise_scale_every: every this many steps, estimate the gradient noise scale from the first
            micro-batch against the whole batch (two half-batches when ``accumulate=1``: the same update
            up to rounding, except over batch norm, where each half is normalised on its own and the
            Trainer warns) and record ``noise_grad_sq``, ``noise_trace`` and ``b_simple`` in the History
            (None: off); needs ``batch_size >= 2``. The estimates carry the finite-population
            correction ``1/B - 1/N`` (N: the training set; a DataLoader whose sampler is not torch's
            shuffling or sequential one uses the ``1/B`` approximation); see ``OnlineNoiseScale``.
        noise_scale_smoothing: EMA weight of the past for the recorded ``b_simple``, in [0, 1).
        checkpoint_segments: activation checkpointing of an ``nn.Sequential`` model in this many
            chunks (0: off); see ``nbbatch.recompute.CheckpointedSequential``.

    Example:
        >>> cfg = TrainConfig(batch_size=1024, lr=0.1, base_batch_size=256, scale_rule="linear")
        >>> cfg.batch_size, cfg.scale_rule
        (1024, 'linear')
    """

    batch_size: int = 64
    lr: float = 0.1
    optimizer: OptimizerSpec = "sgd"
    momentum: float | None = None
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float | None = None
    adapt_all: bool = False
    scale_rule: str = "none"
    base_batch_size: int | None = None
    warmup: str = "none"
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_start: float | None = None
    decay: str = "constant"
    total_steps: int | None = None
    total_epochs: float | None = None
    decay_steps: int | None = None
    decay_epochs: float | None = None
    decay_gamma: float = 0.1
    min_lr_factor: float = 0.0
    accumulate: int = 1
    batch_schedule: Any = None
    clip_grad_norm: float | None = None
    precision: str = "auto"
    device: Any = "auto"
    seed: int | None = 0
    drop_last: bool = False
    loss: Any = "cross_entropy"
    metrics: Mapping[str, Callable] | None = None
    eval_every: int | None = None
    eval_batch_size: int = 4096
    data_on_device: bool = True
    grad_noise: float = 0.0
    grad_noise_gamma: float = 0.55
    noise_scale_every: int | None = None
    noise_scale_smoothing: float = 0.9
    checkpoint_segments: int = 0

    def __post_init__(self):
        self._check_positive_int("batch_size")
        self._check_positive_int("accumulate")
        self._check_positive_int("eval_batch_size")
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
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if isinstance(self.optimizer, str):
            if self.optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer={self.optimizer!r} is not known; use one of {OPTIMIZERS} "
                                 f"or pass a factory such as torch.optim.RMSprop")
        elif not callable(self.optimizer):
            raise TypeError(f"optimizer must be a name or a callable factory, got {type(self.optimizer).__name__}")
        if self.momentum is not None and (not _is_number(self.momentum) or not 0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ValueError("optimizer='nesterov' needs momentum > 0")
        if not _is_number(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.eps is not None and (not _is_number(self.eps) or not math.isfinite(self.eps) or not self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0 or None (the optimizer's default), got {self.eps!r}")
        if not isinstance(self.adapt_all, bool):
            raise TypeError(f"adapt_all must be True or False, got {self.adapt_all!r}")
        if self.adapt_all and self.optimizer not in ("lars", "lamb"):
            raise ValueError(f"adapt_all=True applies to optimizer='lars' or 'lamb' (their trust ratio), "
                             f"got optimizer={self.optimizer!r}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule={self.scale_rule!r} is not known; use one of {SCALE_RULES}")
        if self.base_batch_size is not None:
            self._check_positive_int("base_batch_size")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup={self.warmup!r} is not known; use one of {WARMUPS}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r} is not known; use one of {DECAYS}")
        self._check_length_pair("warmup_steps", "warmup_epochs")
        self._check_length_pair("total_steps", "total_epochs")
        self._check_length_pair("decay_steps", "decay_epochs")
        if self.warmup != "none" and self.warmup_steps is None and self.warmup_epochs is None:
            raise ValueError(f"warmup={self.warmup!r} needs a length: set warmup_steps or warmup_epochs")
        if self.decay == "step" and self.decay_steps is None and self.decay_epochs is None:
            raise ValueError("decay='step' needs an interval: set decay_steps or decay_epochs")
        if self.warmup_start is not None and (not _is_number(self.warmup_start) or not 0.0 <= self.warmup_start <= 1.0):
            raise ValueError(f"warmup_start must lie in [0, 1], got {self.warmup_start!r}")
        if not _is_number(self.decay_gamma) or not 0.0 < self.decay_gamma <= 1.0:
            raise ValueError(f"decay_gamma must lie in (0, 1], got {self.decay_gamma!r}")
        if not _is_number(self.min_lr_factor) or not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"min_lr_factor must lie in [0, 1], got {self.min_lr_factor!r}")
        if self.clip_grad_norm is not None and (not _is_number(self.clip_grad_norm) or not self.clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a number > 0 or None, got {self.clip_grad_norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not known; use one of {PRECISIONS}")
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__} {self.seed!r}")
        if not isinstance(self.drop_last, bool):
            raise TypeError(f"drop_last must be True or False, got {self.drop_last!r}")
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise ValueError(f"loss={self.loss!r} is not known; use one of {LOSSES} or a callable")
        elif not callable(self.loss):
            raise TypeError(f"loss must be a name or a callable, got {type(self.loss).__name__}")
        if self.metrics is not None:
            if not isinstance(self.metrics, Mapping) or not all(isinstance(k, str) and callable(v) for k, v in self.metrics.items()):
                raise TypeError("metrics must be a mapping {name: callable(output, target)}")
            for reserved in ("loss",):
                if reserved in self.metrics:
                    raise ValueError(f"metrics may not be named {reserved!r}: the loss is always recorded")
        if self.eval_every is not None:
            self._check_positive_int("eval_every")
        if not isinstance(self.data_on_device, bool):
            raise TypeError(f"data_on_device must be True or False, got {self.data_on_device!r}")
        for name in ("grad_noise", "grad_noise_gamma"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.noise_scale_every is not None:
            self._check_positive_int("noise_scale_every")
            if self.batch_size < 2:
                raise ValueError(f"noise_scale_every={self.noise_scale_every} compares a smaller batch with the whole "
                                 f"one and needs batch_size >= 2, got batch_size={self.batch_size}")
        if not _is_number(self.noise_scale_smoothing) or not 0.0 <= self.noise_scale_smoothing < 1.0:
            raise ValueError(f"noise_scale_smoothing must lie in [0, 1), got {self.noise_scale_smoothing!r}")
        if not is_int(self.checkpoint_segments) or self.checkpoint_segments < 0 or self.checkpoint_segments == 1:
            raise ValueError(f"checkpoint_segments must be 0 (off) or an int >= 2, got {self.checkpoint_segments!r}")

    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    def _check_length_pair(self, steps_name: str, epochs_name: str) -> None:
        steps, epochs = getattr(self, steps_name), getattr(self, epochs_name)
        if steps is not None and epochs is not None:
            raise ValueError(f"give {steps_name} or {epochs_name}, not both")
        if steps is not None and (not is_int(steps) or steps < 0):
            raise ValueError(f"{steps_name} must be an int >= 0, got {steps!r}")
        if epochs is not None and (not _is_number(epochs) or not math.isfinite(epochs) or epochs < 0):
            raise ValueError(f"{epochs_name} must be a number >= 0, got {epochs!r}")

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

