"""The Trainer: one model, one dataset, one training configuration, and what happened.

The optimizer step (``_train_step``) reads top to bottom: fetch the batch, set the scheduled
learning rate, forward and backward each micro-batch, refuse a non-finite update, clip, step,
record. Everything else (evaluation, stopping, checkpoints) sits around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .batching import DatasetBatches, LoaderBatches, TensorBatches, as_tensors
from .config import TrainConfig
from .device import autocast_context, peak_memory_bytes, reset_peak_memory, resolve_device, resolve_precision
from .diagnostics import OnlineNoiseScale, squared_grad_norm
from .distributed import StopAgreed
from .distributed import resolve as resolve_distributed
from .history import History
from .norms import warn_accumulation_with_bn
from .optim import LAMB, LAMB_EPS, LARS, add_gradient_noise, gradient_noise_std, layerwise_groups
from .memory import checkpointed
from .schedules import Schedule, scale_lr

EVENTS = ("fit_start", "step_end", "eval_end", "fit_end")
CHECKPOINT_VERSION = 1
DEFAULT_UNTIL_EPOCHS = 100
RESCHEDULE_OPTIONS = ("lr", "scale_rule", "base_batch_size", "warmup", "warmup_steps", "warmup_epochs",
                      "warmup_start", "decay", "total_steps", "total_epochs", "decay_steps", "decay_epochs",
                      "decay_gamma", "min_lr_factor")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; the model was left at its last good step."""

    def __init__(self, message: str, *, step: int, lr: float, loss: float):
        super().__init__(message)
        self.step, self.lr, self.loss = step, lr, loss


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest output is the target class.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item()
        0.5
    """
    return (output.argmax(dim=-1) == target).float().mean()


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; an ``(N, 1)`` output is compared with ``(N,)`` targets."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    return F.mse_loss(output, target)


@dataclasses.dataclass(frozen=True)
class Target:
    """A stopping target on a recorded metric: ``metric`` reaching ``value`` (``mode`` min or max)."""

    metric: str
    value: float
    mode: str

    def reached(self, current: float) -> bool:
        return current <= self.value if self.mode == "min" else current >= self.value

    @classmethod
    def parse(cls, until) -> "Target":
        """From ``("eval_accuracy", 0.9)``, ``{"eval_loss": 0.3}``, ``"eval_accuracy>=0.9"`` or a Target.

        Metrics whose name ends in ``loss`` are minimised, all others maximised, unless the
        string form gives the direction with ``<=`` or ``>=``.
        """
        if isinstance(until, Target):
            return until
        mode = None
        if isinstance(until, str):
            for op, m in (("<=", "min"), (">=", "max")):
                if op in until:
                    name, _, value = until.partition(op)
                    mode = m
                    break
            else:
                raise ValueError(f"until={until!r}: write it as 'metric<=value' or 'metric>=value'")
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"until={until!r}: {value.strip()!r} is not a number") from None
            name = name.strip()
        elif isinstance(until, Mapping) and len(until) == 1:
            (name, value), = until.items()
        elif isinstance(until, (tuple, list)) and len(until) == 2:
            name, value = until
        else:
            raise ValueError(f"until={until!r}: give (metric, value), {{metric: value}} or 'metric>=value'")
        if not isinstance(name, str) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"until={until!r}: the metric must be a name and the value a finite number")
        if mode is None:
            mode = "min" if name.endswith("loss") else "max"
        return cls(name, float(value), mode)


class Trainer:
    """Train a model on a dataset with batch-size-aware options, recording everything.

    Args:
        model: the ``nn.Module`` to train (moved to the training device).
        data: an ``nbbatch.data.DataBundle`` (train and test split), a pair ``(x, y)`` of
            tensors or a ``TensorDataset`` (kept on the device and sliced by index), any
            map-style ``Dataset`` (read through a DataLoader in the seeded order) or a
            ``DataLoader`` (used as it is; its batch size is the optimizer batch).
        config: a ``TrainConfig``; keyword options override its fields or build one.
        eval_data: what ``evaluate`` and the evaluations during ``fit`` use; defaults to the
            test split of a DataBundle, else none.
        distributed: ``"auto"`` (data-parallel under torchrun or in an initialised process
            group of several processes), ``False``, ``True``, or an
            ``nbbatch.distributed.Distributed(...)``; see ``nbbatch.distributed``. Data-parallel,
            ``batch_size`` is the global batch and callbacks run on rank 0 only.
        **options: any ``TrainConfig`` field (batch_size, lr, optimizer, accumulate, ...).

    Example:
        >>> from nbbatch import Trainer, data, models
        >>> d = data.mnist1d()
        >>> t = Trainer(models.MLP(), d, batch_size=64, lr=0.05, optimizer="momentum")
        >>> h = t.fit(epochs=2)                        # doctest: +SKIP
        >>> round(t.evaluate()["accuracy"], 2)         # doctest: +SKIP
        0.45
    """

    def __init__(self, model: nn.Module, data, config: TrainConfig | None = None, *, eval_data=None,
                 distributed="auto", **options):
        # ---- validate everything before any state changes -----------------------------------
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if isinstance(data, DataLoader) and config is None and "batch_size" not in options:
            if data.batch_size is None:
                raise ValueError("data: a DataLoader with a batch_sampler has no fixed batch size; pass batch_size=...")
            options = {**options, "batch_size": data.batch_size}
        cfg = TrainConfig(**options) if config is None else config.replace(**options)
        if isinstance(data, DataLoader) and data.batch_size not in (None, cfg.batch_size):
            raise ValueError(f"batch_size={cfg.batch_size} differs from the DataLoader's batch_size={data.batch_size}; "
                             f"the loader's batches are the optimizer batches")
        dist_ctx = resolve_distributed(distributed)
        device = resolve_device(cfg.device)
        if dist_ctx is not None:
            device = dist_ctx.pick_device(cfg.device, device)
        precision = resolve_precision(cfg.precision, device)
        train_xy, eval_xy, spec = _split_data(data, eval_data)
        n_train = len(train_xy[0]) if train_xy is not None else _length(data)
        if n_train == 0:
            raise ValueError("data: the training set is empty")
        if n_train is not None and cfg.batch_size > n_train:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({n_train} examples); "
                             f"use batch_size <= {n_train} (full-batch gradient descent is batch_size={n_train})")
        loss_fn = _resolve_loss(cfg.loss)
        metrics = dict(cfg.metrics) if cfg.metrics is not None else (
            {"accuracy": accuracy} if cfg.loss == "cross_entropy" else {})
        sample = train_xy if train_xy is not None else _first_batch(data)
        _check_fit(model, loss_fn, cfg.loss, sample[0][:2], sample[1][:2],
                   all_labels=train_xy[1] if train_xy is not None else None)
        optimizer = _build_optimizer(cfg, model.parameters())   # a bad factory fails here, before any change
        checkpointed(model, cfg.checkpoint_segments)  # checks the option (an nn.Sequential is needed)
        if dist_ctx is not None:   # the split and the agreement of all ranks, still before any change
            source = "tensors" if train_xy is not None else ("loader" if isinstance(data, DataLoader) else "dataset")
            dist_ctx.check(cfg, n_train, model, device, source, train_xy)

        # ---- build --------------------------------------------------------------------------
        # Accumulating over batch norm normalises each micro-batch on its own: say so, once. Without
        # accumulation the online noise scale splits its measured steps in two halves: the same caveat.
        if cfg.accumulate == 1 and cfg.noise_scale_every is not None:
            warn_accumulation_with_bn(model, cfg.batch_size, 2, stacklevel=2,
                                      cause=f"noise_scale_every={cfg.noise_scale_every} (measured steps run as two half-batches)")
        else:
            warn_accumulation_with_bn(model, cfg.batch_size, cfg.accumulate, stacklevel=2)
        self.config = cfg
        self.device = device
        self.precision = precision
        self.data_spec = spec
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        data_seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        if dist_ctx is not None:
            data_seed = dist_ctx.shared_seed(data_seed)   # one permutation for all ranks
            model = dist_ctx.convert_batchnorm(model)
        before = list(model.parameters())
        self.model = model.to(device)
        if train_xy is not None:
            self._train = TensorBatches(train_xy[0], train_xy[1], device, cfg.batch_size, cfg.drop_last,
                                        data_seed, on_device=cfg.data_on_device)
        elif isinstance(data, DataLoader):
            self._train = LoaderBatches(data, device)
        else:
            self._train = DatasetBatches(data, device, cfg.batch_size, cfg.drop_last, data_seed)
        self._dist = dist_ctx
        # What the training forward calls: the model, or checkpointed chunks of it; DDP when data-parallel.
        self._net = checkpointed(self.model, cfg.checkpoint_segments)
        if dist_ctx is not None:
            self._train = dist_ctx.shard(self._train)   # this rank's share of each global batch
            self._net = dist_ctx.wrap(self._net, device)
        self._eval_data = eval_xy
        self._eval_cache = None
        self.loss_fn = loss_fn
        self.metrics = metrics
        if any(p is not q for p, q in zip(before, model.parameters())):
            optimizer = _build_optimizer(cfg, model.parameters())   # .to() replaced the parameters
        self.optimizer = optimizer
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = _grad_scaler(device) if precision == "fp16" else None
        self._autocast = autocast_context(precision, device)
        self.peak_lr = scale_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size or cfg.batch_size, cfg.scale_rule)
        self.history = History()
        self.step_count = 0              # optimizer steps completed
        self.epoch = 0                   # epoch the next batch comes from
        self.batch_in_epoch = 0          # index of the next batch within that epoch
        self.examples_seen = 0
        self.train_time = 0.0            # seconds spent in training steps (evaluations excluded)
        self._data_seed = data_seed
        self._horizon: int | None = None  # schedule length in steps, fixed by the first fit
        self._plan_end: int | None = None  # step at which the current fit ends
        self._plan_until: Target | None = None
        self._schedule: Schedule | None = None
        self._batches = None
        self._current_lr: float | None = None
        self._stop_requested = False
        self._interrupted = False
        self._found_inf = torch.zeros(1, device=device)
        # On the CPU the flag is read through a NumPy view of the same memory: ops there are
        # synchronous, and this skips a torch call in every step.
        self._found_host = self._found_inf.numpy() if device.type == "cpu" else None
        self._one = torch.ones(1, device=device)
        self._callbacks: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self._reads_memory = device.type != "cpu"   # the CPU keeps no allocator statistics
        self._noise = None
        if cfg.noise_scale_every is not None:
            # The finite-population correction needs N, the examples each global batch is drawn from
            # without replacement; None (McCandlish's 1/B) where the source does not say.
            self._noise = OnlineNoiseScale(cfg.noise_scale_every, cfg.noise_scale_smoothing,
                                           population=_sampled_population(data, n_train))

    # ------------------------------------------------------------------ small public surface
    @property
    def steps_per_epoch(self) -> int:
        return self._train.steps_per_epoch

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self._get_schedule()(self.step_count)

    def add_callback(self, event: str, fn: Callable[["Trainer", dict], Any]) -> None:
        """Call ``fn(trainer, row)`` on ``event``: fit_start, step_end, eval_end or fit_end.

        ``row`` is the history row just recorded (empty for fit_start/fit_end).
        """
        if event not in EVENTS:
            raise ValueError(f"event={event!r} is not known; use one of {EVENTS}")
        if not callable(fn):
            raise TypeError("fn must be callable")
        self._callbacks[event].append(fn)

    def remove_callback(self, event: str, fn: Callable) -> None:
        self._callbacks[event].remove(fn)

    def request_stop(self) -> None:
        """Ask a running ``fit`` to stop after the current optimizer step (safe from any thread)."""
        self._stop_requested = True

    @property
    def rank(self) -> int:
        """This process's rank (0 without data parallelism)."""
        return self._dist.rank if self._dist is not None else 0

    @property
    def world_size(self) -> int:
        """Processes training together (1 without data parallelism)."""
        return self._dist.world_size if self._dist is not None else 1

    @property
    def is_main_process(self) -> bool:
        """True on the process that prints, plots and writes checkpoints (rank 0)."""
        return self.rank == 0

    def reschedule(self, **changes) -> None:
        """Change learning-rate options mid-run (lr, warm-up, decay); the very next step uses them.

        Only the options that shape ``lr(step)`` may change (``RESCHEDULE_OPTIONS``). The new
        values are validated, and the new schedule built and checked against the run's length,
        before anything changes: on an error the old schedule stays. Call it between steps
        (from a ``step_end`` callback, or while no ``fit`` runs).

        Example:
            >>> from nbbatch import Trainer, data, models
            >>> t = Trainer(models.MLP(), data.mnist1d(num_samples=200), batch_size=32, lr=0.1)
            >>> t.reschedule(lr=0.02); round(t.lr, 4)
            0.02
        """
        unknown = set(changes) - set(RESCHEDULE_OPTIONS)
        if unknown:
            raise ValueError(f"reschedule: {sorted(unknown)} cannot change mid-run; "
                             f"it accepts {list(RESCHEDULE_OPTIONS)}")
        cfg = self.config.replace(**changes)
        old = self.config, self.peak_lr
        self.config = cfg
        self.peak_lr = scale_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size or cfg.batch_size, cfg.scale_rule)
        try:
            schedule = None
            if self._schedule is not None:
                schedule = self._build_schedule(self._horizon)
                if schedule.warmup != "none" and self._horizon is not None and schedule.warmup_steps > self._horizon:
                    raise ValueError(f"the warm-up ({schedule.warmup_steps} steps) is longer than the run "
                                     f"({self._horizon} steps); shorten warmup_steps/warmup_epochs")
        except BaseException:
            self.config, self.peak_lr = old
            raise
        if schedule is not None:
            self._schedule = schedule

    def _trigger(self, event: str, row: dict) -> None:
        if self._dist is not None and not self._dist.is_main:
            return   # data-parallel: prints and plots come from rank 0 only
        for fn in self._callbacks[event]:
            fn(self, row)

    # ------------------------------------------------------------------ schedule
    def _steps(self, steps: int | None, epochs: float | None) -> int | None:
        if steps is not None:
            return steps
        if epochs is not None:
            return max(int(round(epochs * self.steps_per_epoch)), 1 if epochs > 0 else 0)
        return None

    def _build_schedule(self, horizon: int | None) -> Schedule:
        cfg = self.config
        warmup_steps = self._steps(cfg.warmup_steps, cfg.warmup_epochs) or 0
        start = cfg.warmup_start
        if start is None:
            k = self.peak_lr / cfg.lr if cfg.lr > 0 else 1.0
            start = 1.0 / k if k > 1.0 else 0.1
        total = self._steps(cfg.total_steps, cfg.total_epochs) or horizon
        return Schedule(self.peak_lr, warmup=cfg.warmup, warmup_steps=warmup_steps if cfg.warmup != "none" else 0,
                        warmup_start=start, decay=cfg.decay, total_steps=total,
                        decay_every=self._steps(cfg.decay_steps, cfg.decay_epochs), decay_gamma=cfg.decay_gamma,
                        min_factor=cfg.min_lr_factor)

    def _get_schedule(self, horizon: int | None = None) -> Schedule:
        if self._schedule is None:
            self._schedule = self._build_schedule(self._horizon if self._horizon is not None else horizon)
        return self._schedule

    # ------------------------------------------------------------------ the optimizer step
    def _next_batch(self):
        if self._batches is None:
            self._batches = self._train.batches(self.epoch, self.batch_in_epoch)
        try:
            return next(self._batches)
        except StopIteration:
            # The source ran out early (a loader shorter than its len): start the next epoch.
            self._advance_epoch()
            self._batches = self._train.batches(self.epoch, 0)
            return next(self._batches)

    def _advance_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self._batches = None

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        xb, yb = self._next_batch()                          # 1. the batch, already on the device
        n = xb.shape[0]
        world = 1
        if self._dist is not None:                            # xb is this rank's share of a global batch of n
            n, world = self._train.last_global_n, self._dist.world_size
        lr = self._schedule(self.step_count)                  # 2. the scheduled lr (pure in the step)
        if lr != self._current_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._current_lr = lr
        self.optimizer.zero_grad(set_to_none=True)
        k = min(self.config.accumulate, xb.shape[0])          # a short last batch may hold fewer examples
        noise_due = self._noise is not None and self._noise.due(self.step_count) and xb.shape[0] > 1
        if noise_due and k == 1:
            k = 2   # the estimate needs a smaller batch: two half-batches (the same update up to rounding)
        micro = zip(xb.tensor_split(k), yb.tensor_split(k)) if k > 1 else ((xb, yb),)
        total = None
        sq_small = None
        for i, (xm, ym) in enumerate(micro):                  # 3. forward + backward per micro-batch
            last = i == k - 1
            with self._sync(last):                            # data-parallel: all-reduce on the last only
                with self._autocast:
                    loss = self.loss_fn(self._net(xm), ym)
                if k > 1 or world > 1:
                    # Each micro-batch loss is a mean over its m examples; weighting it by m/n makes the
                    # summed gradients those of the mean over all n examples, so K micro-batches give
                    # exactly the update of one batch (uneven splits included). Over W processes the
                    # weight is m*W/n, because DDP divides the summed gradients by W.
                    loss = loss * ((xm.shape[0] * world) / n)
                total = loss.detach() if total is None else total + loss.detach()
                if last and self._dist is not None:           # the loss and a stop request ride on DDP's
                    self._dist.attach(total, self._stop_requested)   # gradient all-reduce
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if noise_due and sq_small is None:
                # .grad now holds (m*W/n) * g_small, the first micro-batch's mean gradient, weighted
                # (not yet all-reduced: the first micro-batch runs under no_sync when data-parallel)
                b_small = xm.shape[0]
                sq_small = squared_grad_norm(self._params) * (n / (b_small * world)) ** 2
        if self._dist is not None:
            total, stop = self._dist.collect()                # the global batch's loss, on every rank
            if stop:                                          # some rank asked to stop: no rank updates
                self._stop_requested = True
                raise StopAgreed
        loss_value, grads_finite = self._read_loss_and_check_grads(total)
        if not (grads_finite and math.isfinite(loss_value)):  # 4. never apply a non-finite update
            self._diverged(loss_value, lr)
        noise = self._noise.EMPTY if self._noise is not None else None
        if noise_due:                                         # (optional) the gradient noise scale
            sq_big = squared_grad_norm(self._params)
            if self.scaler is None:
                noise = self._noise.record(sq_small, sq_big, b_small, n)
            else:
                # Under fp16 an overflowed step reaches here (the scaler skips it below): its inf/nan
                # norms would poison the EMA for the rest of the run, so such a step records nothing.
                scale2 = self.scaler.get_scale() ** 2
                sq_small, sq_big = sq_small / scale2, sq_big / scale2
                if bool(torch.isfinite(sq_small) & torch.isfinite(sq_big)):
                    noise = self._noise.record(sq_small, sq_big, b_small, n)
        if self.config.clip_grad_norm is not None:            # 5. clip (on true, unscaled gradients)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.config.clip_grad_norm)
        if self.config.grad_noise > 0:                        # 5b. gradient noise N(0, eta/(1+t)^gamma)
            if self.scaler is not None and self.config.clip_grad_norm is None:
                self.scaler.unscale_(self.optimizer)
            generator = None
            if self._dist is not None:
                # Every rank must add the same noise to the same all-reduced gradients, whatever its
                # global generator did (unseeded, or dropout on uneven shards): draw it from the
                # ranks' shared seed and the step.
                seed = ((self._data_seed << 32) + self.step_count) % (1 << 63)   # any int seed, in manual_seed's range
                generator = torch.Generator(self.device).manual_seed(seed)
            add_gradient_noise(self._params, gradient_noise_std(self.step_count, self.config.grad_noise,
                                                                self.config.grad_noise_gamma), generator)
        if self.scaler is not None:                           # 6. the update
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        dt = time.perf_counter() - t0
        self.step_count += 1                                  # 7. record
        self.examples_seen += n
        self.train_time += dt
        self.batch_in_epoch += 1
        per_epoch = self._train.steps_per_epoch
        epoch_progress = self.epoch + self.batch_in_epoch / per_epoch
        if self.batch_in_epoch >= per_epoch:
            self._advance_epoch()
        row = {"step": self.step_count, "epoch": epoch_progress, "examples": self.examples_seen,
               "loss": loss_value, "lr": lr, "batch_size": n, "time": self.train_time,
               "examples_per_s": n / dt if dt > 0 else float("inf"),
               "peak_memory": peak_memory_bytes(self.device) if self._reads_memory else None}
        if noise is not None:
            row.update(noise)
        self.history.steps.append(row)
        if self._callbacks["step_end"]:
            self._trigger("step_end", row)
        return row

    def _sync(self, last: bool):
        return self._dist.sync_context(self._net, last) if self._dist is not None else contextlib.nullcontext()

    def _read_loss_and_check_grads(self, loss: torch.Tensor) -> tuple[float, bool]:
        """The step's loss as a float, and whether every gradient is finite (one device sync)."""
        if self.scaler is not None:
            # Under fp16 the scaler checks the gradients itself and skips such steps.
            return loss.item(), True
        # One fused pass over all gradients (the check GradScaler uses): an infinite gradient
        # with a finite loss would otherwise turn the weights into inf/nan. The flag is only
        # ever set here, so it needs zeroing only after a failure.
        _flag_nonfinite([p.grad for p in self._params if p.grad is not None], self._found_inf, self._one)
        if self._found_host is not None:
            return loss.item(), self._found_host[0] == 0
        value, flag = torch.cat([loss.detach().float().reshape(1), self._found_inf]).tolist()
        return value, flag == 0

    def _diverged(self, loss_value: float, lr: float) -> None:
        self._found_inf.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self._batches = None   # the failed batch is not consumed: the position stays put
        what = "loss" if not math.isfinite(loss_value) else "gradient"
        self.history.events.append({"step": self.step_count, "event": "diverged",
                                    "detail": f"non-finite {what} (loss={loss_value}) at lr={lr:.4g}"})
        raise DivergenceError(
            f"training diverged at step {self.step_count + 1}: non-finite {what} (loss={loss_value}) "
            f"at lr={lr:.4g}. The model is left at step {self.step_count}, its last finite step. "
            f"Try a smaller lr, a warm-up (warmup='linear'), or gradient clipping (clip_grad_norm=1.0).",
            step=self.step_count + 1, lr=lr, loss=loss_value)

    def step(self) -> dict:
        """Run exactly one optimizer step (for interactive use) and return its history row."""
        self._stop_requested = False
        self._get_schedule(self._horizon)
        return self._guarded_step()

    def _guarded_step(self) -> dict:
        try:
            return self._train_step()
        except DivergenceError:
            raise
        except BaseException:
            # An interrupt or out-of-memory error inside the step: no update happened unless the
            # optimizer itself was interrupted; drop partial gradients and re-read the batch.
            self.optimizer.zero_grad(set_to_none=True)
            self._batches = None
            if self.scaler is not None:
                # The scaler may have unscaled this step's gradients already; until update() it
                # would refuse every later step ("unscale_() has already been called"). A fresh
                # scaler with the same scale and growth tracker forgets the half-done step.
                scaler = _grad_scaler(self.device)
                scaler.load_state_dict(self.scaler.state_dict())
                self.scaler = scaler
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise

    # ------------------------------------------------------------------ fit
    def fit(self, epochs: float | None = None, steps: int | None = None, until=None,
            progress: bool | None = None) -> History:
        """Train and return the History.

        ``epochs`` and ``steps`` count from where the trainer stands (calling ``fit(epochs=1)``
        twice trains two epochs). ``until`` stops as soon as a recorded metric reaches a target,
        for example ``until=("eval_accuracy", 0.9)`` (checked at each evaluation) or
        ``until=("loss", 0.5)`` (the training loss of a step); with ``until`` alone the run is
        capped at 100 epochs. ``fit()`` with no arguments continues a stopped fit to its end.

        A ``request_stop()`` or a KeyboardInterrupt (Jupyter's interrupt) ends the run after
        the current step, leaving a consistent, resumable trainer; the interrupt is re-raised.

        ``progress`` shows a tqdm bar (``tqdm.auto``: a widget in notebooks, text in terminals);
        the default shows it in a terminal, or wherever ``NBBATCH_PROGRESS=1``, and never
        outside the main thread or with ``NBBATCH_PROGRESS=0`` (headless runs); data-parallel,
        only rank 0 shows it.
        """
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        end, target = self._plan(epochs, steps, until)
        horizon = self._horizon if self._horizon is not None else end
        schedule = self._schedule if self._schedule is not None else self._build_schedule(horizon)
        if schedule.warmup != "none" and schedule.warmup_steps > horizon:
            raise ValueError(f"the warm-up ({schedule.warmup_steps} steps) is longer than the run ({horizon} steps); "
                             f"shorten warmup_steps/warmup_epochs or train longer")
        # validated: commit the plan
        self._schedule, self._horizon = schedule, horizon
        self._plan_end, self._plan_until = end, target
        self._stop_requested = False
        self._interrupted = False
        reset_peak_memory(self.device)
        # before the handler: if it fails, none is left installed; data-parallel, on rank 0 only (as prints are)
        bar = _progress_bar(progress, end - self.step_count) if self.is_main_process else None
        previous_handler = self._install_interrupt_handler()
        reason = "completed"
        try:
            self._trigger("fit_start", {})
            last_eval_step = self.history.evals["step"][-1] if len(self.history.evals) else None
            eval_every = self.config.eval_every
            can_eval = self._eval_data is not None
            while self.step_count < end:
                if self._stop_requested and self._dist is None:
                    reason = "interrupted" if self._interrupted else "stopped"
                    break
                epoch_before = self.epoch
                try:
                    row = self._guarded_step()
                except StopAgreed:   # data-parallel: every rank learnt of a stop request in the same step
                    reason = "interrupted" if self._interrupted else "stopped"
                    break
                if bar is not None:
                    bar.update(1)
                    if self.step_count % 50 == 0:
                        bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                if target is not None and target.metric == "loss" and target.reached(row["loss"]):
                    reason = "target"
                    break
                due = (self.step_count % eval_every == 0) if eval_every else self.epoch != epoch_before
                if due and can_eval:
                    ev = self._record_eval()
                    last_eval_step = self.step_count
                    if target is not None and target.metric in ev and target.reached(ev[target.metric]):
                        reason = "target"
                        break
            else:
                reason = "completed"
            # A stop is a pause: no extra evaluation, so a resumed run records what an uninterrupted one does.
            if self._eval_data is not None and last_eval_step != self.step_count and reason in ("completed", "target"):
                ev = self._record_eval()
                if reason == "completed" and target is not None and target.metric in ev and target.reached(ev[target.metric]):
                    reason = "target"
        except KeyboardInterrupt:
            reason = "interrupted"
            raise
        except DivergenceError:
            reason = "diverged"
            raise
        finally:
            if bar is not None:
                bar.close()
            self._restore_interrupt_handler(previous_handler)
            if reason in ("completed", "target"):
                self._plan_end = None
            if reason != "diverged":
                self.history.events.append({"step": self.step_count, "event": reason, "detail": ""})
            if target is not None:
                self.history.target = {"metric": target.metric, "value": target.value, "mode": target.mode,
                                       "reached": reason == "target", "step": self.step_count if reason == "target" else None}
            self._trigger("fit_end", {"reason": reason})
        if reason == "interrupted":
            raise KeyboardInterrupt(f"training interrupted after step {self.step_count}; "
                                    f"the trainer is consistent: call fit() to continue")
        return self.history

    def _plan(self, epochs, steps, until) -> tuple[int, Target | None]:
        given = [name for name, v in (("epochs", epochs), ("steps", steps)) if v is not None]
        if len(given) == 2:
            raise ValueError("give epochs or steps, not both")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                                   or not math.isfinite(epochs) or epochs <= 0):
            raise ValueError(f"epochs must be a number > 0, got {epochs!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        target = Target.parse(until) if until is not None else None
        if target is not None:
            known = self.recorded_metrics()
            if target.metric not in known:
                raise ValueError(f"until: {target.metric!r} is not a recorded metric; recorded: {known}")
        if not given and target is None:
            if self._plan_end is not None and self._plan_end > self.step_count:
                return self._plan_end, self._plan_until
            raise ValueError("fit needs epochs=..., steps=... or until=... (nothing to continue)")
        if given:
            end = self.step_count + self._steps(steps, epochs)
        else:
            end = self.step_count + DEFAULT_UNTIL_EPOCHS * self.steps_per_epoch
        return end, target

    def recorded_metrics(self) -> list[str]:
        """Names usable in ``fit(until=...)``."""
        names = ["loss"]
        if self._eval_data is not None:
            names += ["eval_loss"] + [f"eval_{m}" for m in self.metrics]
        return names

    def _install_interrupt_handler(self):
        # Jupyter's "interrupt kernel" sends SIGINT. Turning the first one into a stop request
        # lets the current step finish, so weights and optimizer state are never half-updated;
        # a second interrupt raises at once.
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._interrupted:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
                raise KeyboardInterrupt
            self._interrupted = True
            self._stop_requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not allowed here (e.g. an embedded interpreter)
            return None
        return (previous,)

    @staticmethod
    def _restore_interrupt_handler(saved) -> None:
        if saved is not None:
            signal.signal(signal.SIGINT, saved[0] if saved[0] is not None else signal.default_int_handler)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data=None) -> dict[str, float]:
        """Loss and metrics of the model on ``data`` (default: the evaluation set).

        ``data`` may be ``"train"``, ``"eval"``, a pair ``(x, y)`` of tensors or a Dataset.
        The model is put in eval mode and restored afterwards; nothing is recorded.
        """
        if data is None or (isinstance(data, str) and data == "eval"):
            if self._eval_data is None:
                raise ValueError("evaluate: this trainer has no evaluation data; pass eval_data= to the Trainer "
                                 "or evaluate(data=(x, y))")
            source = self._eval_tensors()
        elif isinstance(data, str):
            if data != "train":
                raise ValueError(f"evaluate: data={data!r} is not known; use 'train', 'eval', (x, y) or a Dataset")
            source = self._train.whole()
        else:
            source = data
        return self._evaluate_source(source)

    def _eval_tensors(self):
        if self._eval_cache is None:
            x, y = self._eval_data
            self._eval_cache = (x.to(self.device), y.to(self.device)) if isinstance(x, torch.Tensor) else self._eval_data
        return self._eval_cache

    @torch.no_grad()
    def _evaluate_source(self, source) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            xy = as_tensors(source)
            if xy is not None:
                x, y = xy
                bs = self.config.eval_batch_size
                batches = ((x[i:i + bs].to(self.device), y[i:i + bs].to(self.device)) for i in range(0, len(x), bs))
            else:
                loader = source if isinstance(source, DataLoader) else DataLoader(source, batch_size=self.config.eval_batch_size)
                batches = ((b[0].to(self.device), b[1].to(self.device)) for b in loader)
            totals = None
            count = 0
            for xb, yb in batches:
                with self._autocast:
                    out = self.model(xb)
                    values = [self.loss_fn(out, yb)] + [fn(out, yb) for fn in self.metrics.values()]
                # sums weighted by batch length, kept on the device until the end (one sync)
                row = torch.stack([torch.as_tensor(v, device=self.device).float() for v in values]) * len(xb)
                totals = row if totals is None else totals + row
                count += len(xb)
            if count == 0:
                raise ValueError("evaluate: the evaluation data is empty")
            means = (totals / count).tolist()
        finally:
            self.model.train(was_training)
        return dict(zip(["loss", *self.metrics], means))

    def _record_eval(self) -> dict:
        result = self.evaluate()
        row = {"step": self.step_count, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
               "examples": self.examples_seen, "time": self.train_time}
        row.update({f"eval_{k}": v for k, v in result.items()})
        self.history.evals.append(row)
        self._trigger("eval_end", row)
        return row

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: model, optimizer, progress, history, RNG.

        As with ``nn.Module.state_dict``, the tensors are the live ones: ``copy.deepcopy`` the
        result to keep an in-memory snapshot while training goes on (``save`` writes a copy).
        """
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": {
                "step": self.step_count, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "examples": self.examples_seen, "train_time": self.train_time, "data_seed": self._data_seed,
                "horizon": self._horizon, "plan_end": self._plan_end,
                "plan_until": dataclasses.asdict(self._plan_until) if self._plan_until else None,
            },
            "history": self.history.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "data_spec": self.data_spec,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (model, optimizer, progress, history and RNG)."""
        missing = {"model", "optimizer", "progress", "history"} - set(state)
        if missing:
            raise ValueError(f"state is not an nbbatch trainer state: missing {sorted(missing)}")
        if state.get("version", CHECKPOINT_VERSION) > CHECKPOINT_VERSION:
            raise ValueError(f"state has version {state['version']}; this nbbatch reads up to {CHECKPOINT_VERSION}")
        p = state["progress"]
        # Module.load_state_dict copies the tensors that fit before it reports those that do not:
        # check every name and shape first, so a state for another model changes nothing.
        current, saved = self.model.state_dict(), state["model"]
        wrong = sorted(set(current) ^ set(saved)) + [
            k for k in current if k in saved and getattr(saved[k], "shape", None) != getattr(current[k], "shape", None)]
        if wrong:
            raise ValueError(f"state: its model does not fit this trainer's model (names or shapes differ at "
                             f"{wrong[:5]}); load it into the model it was saved from")
        self.optimizer.load_state_dict(state["optimizer"])   # checks its groups before it changes anything
        self.model.load_state_dict(saved)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step_count, self.epoch, self.batch_in_epoch = p["step"], p["epoch"], p["batch_in_epoch"]
        self.examples_seen, self.train_time = p["examples"], p["train_time"]
        self._data_seed = p["data_seed"]
        self._train.seed = p["data_seed"]
        self._horizon, self._plan_end = p["horizon"], p["plan_end"]
        self._plan_until = Target(**p["plan_until"]) if p.get("plan_until") else None
        self._schedule = None
        self._current_lr = None
        self._batches = None
        self.history = History()
        self.history.load_state_dict(state["history"])
        if self._noise is not None:
            self._noise.rebuild(self.history.steps)
        rng = state.get("rng") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (a temporary file renamed into place).

        Data-parallel, rank 0 writes and the other ranks return at once, so calling it on every
        rank and calling it on rank 0 alone both work; ``Trainer.load`` waits for all ranks
        before it reads, so a file saved just before is complete.
        """
        if self._dist is not None and not self._dist.is_main:
            return
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nbbatch-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, data=None, *, eval_data=None, distributed="auto",
             **overrides) -> "Trainer":
        """Rebuild a trainer from a checkpoint written by ``save`` and continue with ``fit()``.

        The checkpoint is read with ``weights_only=True``: a file that would run code when
        unpickled is refused. ``data`` may be left out when the run used a built-in dataset.
        Options that were custom callables (optimizer factory, loss, metrics) must be passed again.
        A data-parallel run resumes on any number of processes (every rank reads the file).
        """
        ctx = resolve_distributed(distributed)
        if ctx is not None:
            ctx.barrier()   # rank 0 may have just written the file
        state = read_checkpoint(path)
        cfg = TrainConfig.from_dict(state["config"], **overrides)
        if data is None:
            spec = state.get("data_spec")
            if spec is None:
                raise ValueError("the checkpoint's data was not a built-in dataset: pass data=... to Trainer.load")
            from .data import load_dataset
            data = load_dataset(spec)
        trainer = cls(model, data, cfg, eval_data=eval_data, distributed=distributed)
        trainer.load_state_dict(state)
        return trainer

    @classmethod
    def from_plan(cls, model: nn.Module, data, plan, config: TrainConfig | None = None, *, eval_data=None,
                  distributed="auto", **options) -> "Trainer":
        """A Trainer running an ``nbbatch.memory.plan(...)``: its batch, accumulation, lr and warm-up.

        Args:
            model, data, eval_data, distributed: as for ``Trainer``.
            plan: an ``nbbatch.memory.Plan`` made for this run's number of processes.
            config, **options: the other fields (optimizer, seed, ...).

        Example:
            >>> import torch
            >>> from nbbatch.memory import plan
            >>> p = plan(64, max_micro_batch=16, base_lr=0.1, base_batch=32)
            >>> x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
            >>> t = Trainer.from_plan(torch.nn.Linear(8, 3), (x, y), p, optimizer="momentum")
            >>> t.config.batch_size, t.config.accumulate, t.peak_lr
            (64, 4, 0.2)
        """
        if not hasattr(plan, "to_config"):
            raise TypeError(f"plan must be an nbbatch.memory.Plan, got {type(plan).__name__}")
        ctx = resolve_distributed(distributed)
        world = ctx.world_size if ctx is not None else 1
        if plan.world_size != world:
            raise ValueError(f"plan: it was made for world_size={plan.world_size} processes but this run has "
                             f"{world}; plan(..., world_size={world})")
        cfg = plan.to_config(config, **options)
        if "batch_size" not in options:
            # The plan's config holds one device's batch; a data-parallel Trainer's batch_size is the global one.
            cfg = cfg.replace(batch_size=plan.target_batch)
        return cls(model, data, cfg, eval_data=eval_data, distributed=distributed)

    def __repr__(self) -> str:
        c = self.config
        return (f"Trainer(batch_size={c.batch_size}, lr={self.peak_lr:.4g}, optimizer={c.optimizer!r}, "
                f"accumulate={c.accumulate}, precision={self.precision!r}, device={str(self.device)!r}, "
                f"step={self.step_count}, epoch={self.epoch})")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU."""
    import pickle

    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a safe nbbatch checkpoint (refused to unpickle: {err})") from err
    if not isinstance(state, dict) or "model" not in state or "progress" not in state:
        raise ValueError(f"{os.fspath(path)!r} is not an nbbatch checkpoint")
    return state


# ---------------------------------------------------------------------- helpers
def _progress_bar(progress: bool | None, total: int):
    """A tqdm bar for ``fit``, or None (see ``fit``'s ``progress``)."""
    if progress is None:
        setting = os.environ.get("NBBATCH_PROGRESS", "").strip().lower()
        if setting in ("0", "false", "off", "no") or threading.current_thread() is not threading.main_thread():
            return None
        progress = setting in ("1", "true", "on", "yes") or sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:   # tqdm is a dependency; a broken install only loses the bar
        return None
    return tqdm(total=total, unit="step", mininterval=0.5, dynamic_ncols=True)


def _flag_nonfinite(tensors: list[torch.Tensor], found: torch.Tensor, one: torch.Tensor) -> None:
    """Set ``found`` to 1 when any element of ``tensors`` is inf or nan (one fused pass where torch has it)."""
    if not tensors:
        return
    try:
        # GradScaler's own check: multiplies by 1.0 (exact) and flags any inf/nan.
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    except (AttributeError, RuntimeError, NotImplementedError):  # older torch or another backend
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            found.fill_(1.0)


def _grad_scaler(device: torch.device):
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()  # pragma: no cover - torch < 2.3


def _build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    name, lr, wd = cfg.optimizer, cfg.lr, cfg.weight_decay
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum_value, nesterov=name == "nesterov", weight_decay=wd)
    adam_eps = 1e-8 if cfg.eps is None else cfg.eps        # torch's (and Kingma & Ba's) default
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=adam_eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=adam_eps, weight_decay=wd)
    if name in ("lars", "lamb"):
        # weight matrices adapted and decayed; 1-D tensors (biases, norms) neither, unless adapt_all
        groups = layerwise_groups(params, wd, cfg.adapt_all)
        if name == "lars":
            return LARS(groups, lr=lr, momentum=cfg.momentum_value, weight_decay=wd)
        return LAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=LAMB_EPS if cfg.eps is None else cfg.eps,
                    weight_decay=wd)
    try:
        opt = name(params, lr=lr)
    except TypeError as err:
        raise TypeError(f"optimizer: the factory must accept (params, lr=...): {err}") from err
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer: the factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _resolve_loss(loss) -> Callable:
    if loss == "cross_entropy":
        return F.cross_entropy
    if loss == "mse":
        return mse_loss
    return loss


def _split_data(data, eval_data):
    """(train (x, y) or None, eval data or None, dataset spec or None)."""
    spec = None
    train_xy = None
    if hasattr(data, "x_train") and hasattr(data, "y_train"):   # an nbbatch DataBundle
        train_xy = (data.x_train, data.y_train)
        if eval_data is None and getattr(data, "x_test", None) is not None and len(data.x_test):
            eval_data = (data.x_test, data.y_test)
        spec = getattr(data, "spec", None)
    elif isinstance(data, DataLoader):
        pass
    elif as_tensors(data) is not None:
        train_xy = as_tensors(data)
    elif isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError("data: an iterable-style Dataset is not supported; pass a map-style Dataset, tensors or a DataLoader")
    else:
        raise TypeError(f"data must be a DataBundle, a pair (x, y) of tensors, a Dataset or a DataLoader, "
                        f"got {type(data).__name__}")
    if train_xy is not None:
        x, y = train_xy
        if len(x) != len(y):
            raise ValueError(f"data: {len(x)} inputs but {len(y)} labels")
    if eval_data is not None:
        xy = as_tensors(eval_data)
        if xy is not None:
            if len(xy[0]) != len(xy[1]):
                raise ValueError(f"eval_data: {len(xy[0])} inputs but {len(xy[1])} labels")
            eval_data = xy
        elif not isinstance(eval_data, (Dataset, DataLoader)):
            raise TypeError(f"eval_data must be a pair (x, y) of tensors, a Dataset or a DataLoader, got {type(eval_data).__name__}")
    return train_xy, eval_data, spec


def _length(data) -> int | None:
    if isinstance(data, DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else None
    return len(data)


def _sampled_population(data, n_train: int | None) -> int | None:
    """N for the online noise scale: the examples each batch is drawn from without replacement.

    Tensors, a DataBundle and a map-style Dataset are shuffled by the Trainer (one permutation per
    epoch, shared by all processes): N is the training set. A DataLoader draws by its sampler: N is
    its dataset's length for torch's shuffling (without replacement) or sequential sampler over the
    whole dataset, else None (unknown: the 1/B approximation).
    """
    if not isinstance(data, DataLoader):
        return n_train
    sampler = getattr(data, "sampler", None)
    whole = n_train is not None and n_train >= 2
    if isinstance(sampler, torch.utils.data.RandomSampler):
        return n_train if whole and not sampler.replacement and sampler.num_samples == n_train else None
    if isinstance(sampler, torch.utils.data.SequentialSampler):
        return n_train if whole else None
    return None


def _first_batch(data):
    if isinstance(data, DataLoader):
        batch = next(iter(data))
        return batch[0], batch[1]
    items = [data[i] for i in range(min(2, len(data)))]
    xs = torch.stack([torch.as_tensor(it[0]) for it in items])
    ys = torch.stack([torch.as_tensor(it[1]) for it in items])
    return xs, ys


@torch.no_grad()
def _check_fit(model: nn.Module, loss_fn, loss_name, x: torch.Tensor, y: torch.Tensor, all_labels=None) -> None:
    """Run two examples through the model (eval mode, nothing updated) and the loss."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters to train") from None
    was_training = model.training
    model.eval()
    try:
        try:
            out = model(x.to(device))
        except Exception as err:
            raise ValueError(f"data: the model cannot take inputs of shape {tuple(x.shape[1:])} "
                             f"(per example): {err}") from err
        y = y.to(device)
        if loss_name == "cross_entropy":
            if y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or out.dim() != 2 or y.dim() != 1:
                raise ValueError(f"labels of shape {tuple(y.shape)} and dtype {y.dtype} do not fit the model's output "
                                 f"of shape {tuple(out.shape)} for cross-entropy: expected int64 class indices of shape "
                                 f"({out.shape[0]},) for an output of shape (N, classes)")
            labels = all_labels if all_labels is not None else y
            lo, hi, classes = int(labels.min()), int(labels.max()), out.shape[-1]
            if lo < 0 or hi >= classes:
                raise ValueError(f"labels range over [{lo}, {hi}] but the model has {classes} outputs; "
                                 f"class indices must lie in [0, {classes - 1}]")
        elif loss_name == "mse":
            o = out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out
            if o.shape != y.shape:
                raise ValueError(f"labels of shape {tuple(y.shape)} do not fit the model's output of shape "
                                 f"{tuple(out.shape)} for the mse loss")
        try:
            loss_fn(out, y)
        except Exception as err:
            raise ValueError(f"labels of shape {tuple(y.shape)} do not fit the model's output of shape "
                             f"{tuple(out.shape)}: {err}") from err
    finally:
        model.train(was_training)
