"""The Trainer: one model, one dataset, one training configuration, and what happened.

The optimizer step (``_train_step``) reads top to bottom: fetch the batch, set the scheduled
learning rate, forward and backward each micro-batch, refuse a non-finite update, clip, step,
record. It has one code path for every setting: a single process holds a ``SingleProcess``
context with the data-parallel context's interface (its calls do nothing), the loss scaler is
always there (disabled unless fp16), the gradient transforms (unscale, clip, gradient noise)
are a list built with the trainer, and the online noise scale watches the micro-batch gradients
from the side (``NoiseProbe``). Everything else (evaluation, stopping, checkpoints) sits
around it.

Tools that train and then undo it (``nbbatch.diagnostics.lr_find``) use public seams:
``snapshot()``/``restore()``, ``override_lr(...)`` and ``step(callbacks=False)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..batching import as_tensors
from ..config import RESCHEDULE_OPTIONS, TrainConfig, check_length
from ..data import load_dataset
from ..device import autocast_context, peak_memory_bytes, reset_peak_memory
from ..distributed import StopAgreed
from ..distributed import resolve as resolve_distributed
from ..history import History, RunLog
from ..noise import OnlineNoiseScale
from ..optim import add_gradient_noise, gradient_noise_std
from ..schedules import Schedule, check_warmup_fits, length_in_steps, scale_lr
from .progress import LabelledBar, progress_bar
from .setup import Setup, batch_source, build_optimizer, prepare_network, validate, warn_split_batch_norm
from .state import TrainerSnapshot, read_checkpoint
from .step import (NoiseProbe, flag_nonfinite, fresh_scaler, grad_scaler, resume_position, rng_state,
                   set_rng_state)
from .stopping import DivergenceError, Target

EVENTS = ("fit_start", "step_end", "eval_end", "fit_end")
CHECKPOINT_VERSION = 1
DEFAULT_UNTIL_EPOCHS = 100


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
        log_dir: a directory for an on-disk run log (None: none): the config, and the History's
            rows appended as training goes (flushed every 2 s, at each evaluation and when a fit
            ends), so ``History.read(log_dir)`` recovers a run whose process died. Data-parallel,
            rank 0 writes it.
        log_checkpoints: also save ``<log_dir>/checkpoint.pt`` (atomically) at every evaluation,
            for ``Trainer.load`` after a dead kernel.
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
                 distributed="auto", log_dir: str | os.PathLike | None = None, log_checkpoints: bool = False,
                 **options):
        # 1. Validate everything before any state changes.
        setup = validate(model, data, config, eval_data, distributed, log_dir, log_checkpoints, options)
        # 2. Build. Building reseeds and draws from the global generators and moves the model: should
        #    any of it still fail, the generators are put back, so a failed construction changes nothing.
        rng = rng_state()
        try:
            self._build(model, data, setup)
        except BaseException:
            set_rng_state(rng)
            raise

    def _build(self, model: nn.Module, data, s: Setup) -> None:
        cfg = s.config
        warn_split_batch_norm(model, cfg)
        self.config, self.device, self.precision, self.data_spec = cfg, s.device, s.precision, s.spec
        self.loss_fn, self.metrics, self._dist = s.loss_fn, s.metrics, s.dist
        # the seeds: the global generator's (model-side draws) and the data order's, shared by all ranks
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        data_seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self._data_seed = s.dist.shared_seed(data_seed)
        # the network: the plain model (the one saved) and the module the training forward calls
        params_before = list(model.parameters())
        self.model, self._net = prepare_network(model, s.dist, s.device, cfg.checkpoint_segments)
        # the batches: this rank's share of each global batch, already on the device
        self._train = s.dist.shard(batch_source(data, s.train_xy, s.device, cfg, self._data_seed))
        self._eval_data, self._eval_cache = s.eval_xy, None
        # the optimizer (built by the validation) and what the step needs besides
        self.optimizer = s.optimizer
        if any(p is not q for p, q in zip(params_before, self.model.parameters())):
            self.optimizer = build_optimizer(cfg, self.model.parameters())   # .to() replaced the parameters
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._build_step_helpers(s.population)
        self._reset_progress()
        self._callbacks: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self._stop_requested = False
        self._interrupted = False
        self.error: BaseException | None = None   # the exception that ended the last fit as 'failed'
        self._busy = threading.Lock()              # one fit / step / lr_find at a time
        self._busy_what: str | None = None
        self._busy_thread: int | None = None
        self._last_batch_problem = s.last_batch_problem
        self._log = RunLog(s.log_dir, cfg.to_dict()) if s.log_dir is not None and s.dist.is_main else None
        self._log_checkpoint = s.log_checkpoint    # data-parallel: rank 0 writes both

    def _build_step_helpers(self, population: int | None) -> None:
        cfg, device = self.config, self.device
        # Disabled (any precision but fp16), the scaler's scale() and unscale_() and update() do
        # nothing and its step() is optimizer.step(): one code path for every precision.
        self.scaler = grad_scaler(device, enabled=self.precision == "fp16")
        self._autocast = autocast_context(self.precision, device)
        self._lr_override: Callable[[int], float] | None = None
        self._current_lr: float | None = None
        self._grad_transforms = self._gradient_transforms()
        # The finite-population correction needs N, the examples each global batch is drawn from
        # without replacement; None (McCandlish's 1/B) where the source does not say.
        online = (OnlineNoiseScale(cfg.noise_scale_every, cfg.noise_scale_smoothing, population=population)
                  if cfg.noise_scale_every is not None else None)
        self._noise = NoiseProbe(online, self._params, self._dist.world_size)
        self._found_inf = torch.zeros(1, device=device)
        # On the CPU the flag is read through a NumPy view of the same memory: ops there are
        # synchronous, and this skips a torch call in every step.
        self._found_host = self._found_inf.numpy() if device.type == "cpu" else None
        self._one = torch.ones(1, device=device)
        self._reads_memory = device.type != "cpu"   # the CPU keeps no allocator statistics

    def _gradient_transforms(self) -> list[Callable[[], None]]:
        """What happens to the summed gradients between the backward and the update, in order."""
        cfg = self.config
        transforms = []
        if cfg.clip_grad_norm is not None or cfg.grad_noise > 0:
            transforms.append(self._unscale)          # clip and noise act on true gradients (fp16)
        if cfg.clip_grad_norm is not None:
            transforms.append(self._clip)
        if cfg.grad_noise > 0:
            transforms.append(self._add_gradient_noise)
        return transforms

    def _reset_progress(self) -> None:
        cfg = self.config
        self.peak_lr = scale_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size or cfg.batch_size, cfg.scale_rule)
        self.history = History()
        self.step_count = 0              # optimizer steps completed
        self.epoch = 0                   # epoch the next batch comes from
        self.batch_in_epoch = 0          # index of the next batch within that epoch
        self.example_in_epoch = 0        # position of the next batch in that epoch's order, in examples
        self.examples_seen = 0
        self.train_time = 0.0            # seconds spent in training steps (evaluations excluded)
        self._horizon: int | None = None  # schedule length in steps, fixed by the first fit
        self._plan_end: int | None = None  # step at which the current fit ends
        self._plan_until: Target | None = None
        self._schedule: Schedule | None = None
        self._batches = None             # the live iterator over the current epoch's batches
        self._eval_pending = False       # an evaluation due at step_count was not recorded

    # ------------------------------------------------------------------ small public surface
    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in the current epoch (at its batch size, under a ``batch_schedule``)."""
        return self._train.steps_in_epoch(self.epoch)

    def training_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The training set's ``(x, y)`` tensors when the trainer holds them in memory, else None.

        The tensors are the trainer's own (on the training device unless ``data_on_device=False``),
        not copies: read them, do not change them. A trainer reading a ``Dataset`` or a
        ``DataLoader`` holds no such tensors (see :attr:`training_data`).

        Example:
            >>> import torch
            >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
            >>> t = Trainer(torch.nn.Linear(4, 2), (x, y), batch_size=8)
            >>> tx, ty = t.training_tensors()
            >>> bool(torch.equal(tx, x)), bool(torch.equal(ty, y))
            (True, True)
        """
        return self._train.whole() if self._train.kind == "tensors" else None

    @property
    def training_data(self):
        """What the trainer trains on: the ``(x, y)`` tensors, the ``Dataset`` or the ``DataLoader``.

        Example:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
            >>> t = Trainer(torch.nn.Linear(4, 2), loader)
            >>> t.training_data is loader, t.training_tensors() is None
            (True, True)
        """
        return self._train.whole()

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return (self._lr_override or self._get_schedule())(self.step_count)

    def add_callback(self, event: str, fn: Callable[["Trainer", dict], Any]) -> None:
        """Call ``fn(trainer, row)`` on ``event``: fit_start, step_end, eval_end or fit_end.

        ``row`` is the history row just recorded (empty for fit_start; ``{"reason": ...}`` for
        fit_end, with ``"error"`` when the fit failed). At an evaluation step, eval_end runs
        before that step's step_end. A callback may read the trainer and call
        ``request_stop()``, ``reschedule()``, ``evaluate()``, ``state_dict()`` and ``save()``
        (a checkpoint saved from any callback resumes exactly); ``fit``, ``step``, ``lr_find``
        and ``load_state_dict`` raise a RuntimeError there, as they do from another thread
        while a fit runs. An exception a callback raises ends the fit as failed.
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
        return self._dist.rank

    @property
    def world_size(self) -> int:
        """Processes training together (1 without data parallelism)."""
        return self._dist.world_size

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
                schedule = self._build_schedule(self._horizon)   # checks the warm-up against the run
        except BaseException:
            self.config, self.peak_lr = old
            raise
        if schedule is not None:
            self._schedule = schedule

    def _trigger(self, event: str, row: dict) -> None:
        if not self._dist.is_main:
            return   # data-parallel: prints and plots come from rank 0 only
        for fn in self._callbacks[event]:
            fn(self, row)

    # ------------------------------------------------------------------ schedule
    def _steps(self, steps: int | None, epochs: float | None, from_now: bool = False) -> int | None:
        batch_schedule = self.config.batch_schedule_value
        if steps is not None or epochs is None or batch_schedule is None:
            return length_in_steps(steps, epochs, self.steps_per_epoch)
        # Epochs differ in steps: count each epoch's own, from step 0 (schedule lengths) or from
        # where the trainer stands (fit lengths).
        n, drop_last = self._train.n, self.config.drop_last
        start, before = 0.0, 0
        if from_now:
            start = self.epoch + self.batch_in_epoch / self.steps_per_epoch
            before = batch_schedule.steps(self.epoch, n, drop_last) + self.batch_in_epoch
        return max(batch_schedule.steps(start + epochs, n, drop_last) - before, 1 if epochs > 0 else 0)

    def _build_schedule(self, horizon: int | None) -> Schedule:
        cfg = self.config
        warmup_steps = self._steps(cfg.warmup_steps, cfg.warmup_epochs) or 0
        start = cfg.warmup_start
        if start is None:
            k = self.peak_lr / cfg.lr if cfg.lr > 0 else 1.0
            start = 1.0 / k if k > 1.0 else 0.1
        total = self._steps(cfg.total_steps, cfg.total_epochs) or horizon
        schedule = Schedule(self.peak_lr, warmup=cfg.warmup, warmup_steps=warmup_steps if cfg.warmup != "none" else 0,
                            warmup_start=start, decay=cfg.decay, total_steps=total,
                            decay_steps=self._steps(cfg.decay_steps, cfg.decay_epochs), decay_gamma=cfg.decay_gamma,
                            min_lr_factor=cfg.min_lr_factor)
        check_warmup_fits(schedule.warmup_steps, horizon)   # the run's length, which total_steps may exceed
        return schedule

    def _get_schedule(self, horizon: int | None = None) -> Schedule:
        if self._schedule is None:
            self._schedule = self._build_schedule(self._horizon if self._horizon is not None else horizon)
        return self._schedule

    # ------------------------------------------------------------------ the optimizer step
    def _next_batch(self):
        if self._batches is None:
            self._batches = self._train.batches(self.epoch, self.example_in_epoch)
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
        self.example_in_epoch = 0
        self._batches = None

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        xb, yb = self._next_batch()                           # 1. the batch (this rank's share), on the device
        n = self._dist.global_batch_size(self._train, xb)     #    examples in the whole (global) batch
        lr = self._apply_lr()                                 # 2. the scheduled lr (pure in the step)
        self.optimizer.zero_grad(set_to_none=True)
        k = min(self.config.accumulate, xb.shape[0])          # a short last batch may hold fewer examples
        k = self._noise.split(self.step_count, k, xb.shape[0])
        self._forward_backward(xb, yb, n, k)                  # 3. forward + backward per micro-batch
        total, stop = self._dist.collect()                    #    the global batch's loss, on every rank
        if stop:                                              #    some rank asked to stop: no rank updates
            self._stop_requested = True
            raise StopAgreed
        loss_value, grads_finite = self._read_loss_and_check_grads(total)
        if not (grads_finite and math.isfinite(loss_value)):  # 4. never apply a non-finite update
            self._diverged(loss_value, lr)
        noise = self._noise.measure(n, self.scaler)           #    (optional) the gradient noise scale
        for transform in self._grad_transforms:               # 5. unscale, clip, add gradient noise
            transform()
        self.scaler.step(self.optimizer)                      # 6. the update (fp16: skipped on overflow)
        self.scaler.update()
        return self._record_step(t0, n, loss_value, lr, noise)  # 7. record

    def _apply_lr(self) -> float:
        """Set the optimizer's lr for this step (the schedule's, or an override's) and return it."""
        lr = (self._lr_override or self._schedule)(self.step_count)
        if lr != self._current_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._current_lr = lr
        return lr

    def _forward_backward(self, xb: torch.Tensor, yb: torch.Tensor, n: int, k: int) -> None:
        """Forward and backward ``k`` micro-batches of ``(xb, yb)``; ``.grad`` then holds the batch's mean gradient.

        The weighted loss sum goes to the data-parallel context (``collect`` returns it).
        """
        world = self._dist.world_size
        micro = zip(xb.tensor_split(k), yb.tensor_split(k)) if k > 1 else ((xb, yb),)
        total = None
        for i, (xm, ym) in enumerate(micro):
            last = i == k - 1
            with self._dist.sync_context(self._net, last):    # data-parallel: all-reduce on the last only
                with self._autocast:
                    try:
                        loss = self.loss_fn(self._net(xm), ym)
                    except (IndexError, RuntimeError) as err:
                        self._check_batch_labels(ym, err)   # a clearer error for a label out of range
                        raise
                # Each micro-batch loss is a mean over its m examples; weighting it by m/n makes the
                # summed gradients those of the mean over all n examples, so K micro-batches give
                # exactly the update of one batch (uneven splits included). Over W processes the
                # weight is m*W/n, because DDP divides the summed gradients by W. (A weight of
                # exactly 1, one whole batch, would multiply by 1: skipped.)
                weight = xm.shape[0] * world / n
                if weight != 1.0:
                    loss = loss * weight
                total = loss.detach() if total is None else total + loss.detach()
                if last:                                      # data-parallel, the loss and a stop request
                    self._dist.attach(total, self._stop_requested)   # ride on DDP's gradient all-reduce
                self.scaler.scale(loss).backward()
            if i == 0:
                self._noise.after_first(xm.shape[0], n)

    # the gradient transforms (see _gradient_transforms), on the summed gradients of a finite step
    def _unscale(self) -> None:
        self.scaler.unscale_(self.optimizer)   # fp16: divide by the loss scale (once per step); else nothing

    def _clip(self) -> None:
        torch.nn.utils.clip_grad_norm_(self._params, self.config.clip_grad_norm)

    def _add_gradient_noise(self) -> None:
        # N(0, eta/(1+t)^gamma); data-parallel, drawn alike on every rank (see shared_generator)
        generator = self._dist.shared_generator(self._data_seed, self.step_count, self.device)
        std = gradient_noise_std(self.step_count, self.config.grad_noise, self.config.grad_noise_gamma)
        add_gradient_noise(self._params, std, generator)

    def _record_step(self, t0: float, n: int, loss_value: float, lr: float, noise: dict) -> dict:
        dt = time.perf_counter() - t0
        self.step_count += 1
        self.examples_seen += n
        self.train_time += dt
        self.batch_in_epoch += 1
        self.example_in_epoch += n
        per_epoch = self.steps_per_epoch
        epoch_progress = self.epoch + self.batch_in_epoch / per_epoch
        if self.batch_in_epoch >= per_epoch:
            self._advance_epoch()
        row = {"step": self.step_count, "epoch": epoch_progress, "examples": self.examples_seen,
               "loss": loss_value, "lr": lr, "batch_size": n, "time": self.train_time,
               "examples_per_s": n / dt if dt > 0 else float("inf"),
               "peak_memory": peak_memory_bytes(self.device) if self._reads_memory else None}
        row.update(noise)
        self.history.steps.append(row)
        return row

    def _check_batch_labels(self, y: torch.Tensor, err: BaseException) -> None:
        if self.config.loss != "cross_entropy" or y.dtype != torch.int64 or y.numel() == 0:
            return
        classes = None
        for module in reversed(list(self.model.modules())):   # the last layer's width, when it says
            classes = getattr(module, "out_features", None)
            if classes is not None:
                break
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (hi >= classes if classes is not None else "out of bounds" in str(err)):
            raise ValueError(f"data: the batch of step {self.step_count + 1} (epoch {self.epoch}, batch "
                             f"{self.batch_in_epoch}) has labels in [{lo}, {hi}]"
                             + (f" but the model has {classes} outputs" if classes is not None else "")
                             + f"; class indices must lie in [0, classes - 1]. The trainer is still at step "
                             f"{self.step_count} ({err})") from err

    def _read_loss_and_check_grads(self, loss: torch.Tensor) -> tuple[float, bool]:
        """The step's loss as a float, and whether every gradient is finite (one device sync)."""
        if self.scaler.is_enabled():
            # Under fp16 the scaler checks the gradients itself and skips such steps.
            return loss.item(), True
        # One fused pass over all gradients (the check GradScaler uses): an infinite gradient
        # with a finite loss would otherwise turn the weights into inf/nan. The flag is only
        # ever set here, so it needs zeroing only after a failure.
        flag_nonfinite([p.grad for p in self._params if p.grad is not None], self._found_inf, self._one)
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

    def step(self, *, callbacks: bool = True) -> dict:
        """Run exactly one optimizer step (for interactive use) and return its history row.

        The ``step_end`` callbacks run after it (``callbacks=False``: none, for a tool's trial
        steps); no evaluation is made. A step that fails (an error, an interrupt, a divergence)
        leaves the trainer at its last step, its batch unread. A tool that holds the trainer
        (``with trainer.exclusive("lr_find"):``) may call it inside its hold.
        """
        if not isinstance(callbacks, bool):
            raise TypeError(f"callbacks must be True or False, got {callbacks!r}")
        with self._hold("step"):
            self._check_last_batch(1)
            self._stop_requested = False
            self._eval_pending = False   # a step moves on: an evaluation missed at the last step stays missed
            if self._lr_override is None:
                self._get_schedule(self._horizon)
            row = self._guarded_step()
            if callbacks:
                self._trigger("step_end", row)
            return row

    @contextlib.contextmanager
    def override_lr(self, lr_of_step: Callable[[int], float]):
        """Within the block, each step's learning rate is ``lr_of_step(step)`` instead of the schedule's.

        ``step`` is the trainer's ``step_count`` before the step. The schedule and the config are
        left as they are: after the block the next step follows the schedule again. For tools
        that try learning rates (``lr_find``) and hand-made policies.

        Example:
            >>> import torch
            >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
            >>> t = Trainer(torch.nn.Linear(8, 3), (x, y), batch_size=16, lr=0.1, seed=0)
            >>> with t.override_lr(lambda step: 0.01 * 2 ** step):
            ...     rows = [t.step(), t.step()]
            >>> [r["lr"] for r in rows], t.step()["lr"]
            ([0.01, 0.02], 0.1)
        """
        if not callable(lr_of_step):
            raise TypeError(f"lr_of_step must be callable (step -> lr), got {type(lr_of_step).__name__}")
        self._refuse_from_another_thread("override_lr")
        previous, self._lr_override = self._lr_override, lr_of_step
        try:
            yield self
        finally:
            self._lr_override = previous

    def _refuse_from_another_thread(self, what: str) -> None:
        busy, thread = self._busy_what, self._busy_thread
        if busy is not None and thread != threading.get_ident():
            raise RuntimeError(f"{what}: this trainer is running {busy}() in another thread; call it from a "
                               f"callback (add_callback('step_end', ...)), or after that call returns")

    def _check_last_batch(self, steps: int) -> None:
        """Refuse ``steps`` more steps when they reach a last batch that batch norm cannot normalise."""
        if self._last_batch_problem is not None and steps >= self.steps_per_epoch - self.batch_in_epoch:
            raise ValueError(self._last_batch_problem)

    def _hold(self, what: str):
        """``exclusive(what)``; inside a tool's own hold (lr_find's), in that thread, nothing more."""
        if self._busy_thread == threading.get_ident() and self._busy_what not in (None, "fit", "step"):
            return contextlib.nullcontext(self)
        return self.exclusive(what)

    @contextlib.contextmanager
    def exclusive(self, what: str):
        """Hold the trainer for one training call (``fit``, ``step``, ``lr_find``, ...).

        A second such call while one runs, from another thread or from a callback, is refused
        with a RuntimeError instead of interleaving two runs' steps on one model. ``fit``,
        ``step``, ``restore`` and ``load_state_dict`` take it themselves; a tool that trains and
        then undoes its steps (``lr_find``) holds it around its work, and inside its hold calls
        ``snapshot()``, ``step(callbacks=False)`` and ``restore()`` (the latter two then run in
        the tool's hold).
        """
        if not self._busy.acquire(blocking=False):
            where = "from one of its callbacks" if self._busy_thread == threading.get_ident() else "in another thread"
            raise RuntimeError(f"{what}: this trainer is already running {self._busy_what}() ({where}); one fit, "
                               f"step or lr_find at a time. A callback may read the trainer and call request_stop(), "
                               f"reschedule(), evaluate(), state_dict() or save(); from another thread, call "
                               f"request_stop() and wait for the running call to return")
        self._busy_what, self._busy_thread = what, threading.get_ident()
        try:
            yield self
        finally:
            self._busy_what = self._busy_thread = None
            self._busy.release()

    def _guarded_step(self) -> dict:
        # The step may draw from the global generators (dropout, gradient noise): a step that does
        # not complete gives back what it drew, so a resumed run draws the same numbers.
        rng = torch.default_generator.get_state()   # ~4 us on the CPU (a 5 KB copy)
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            return self._train_step()
        except BaseException:
            # An interrupt, an error or a divergence inside the step: no update happened unless the
            # optimizer itself was interrupted; drop partial gradients and re-read the batch.
            torch.default_generator.set_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            self._batches = None
            # The scaler may have unscaled this step's gradients already; until update() it would
            # refuse every later step ("unscale_() has already been called"). A fresh scaler with
            # the same scale and growth tracker forgets the half-done step.
            self.scaler = fresh_scaler(self.scaler, self.device)
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

        Any other exception (from the loss, a metric, the data or a callback) ends the run as
        ``failed``: the event and ``trainer.error`` keep it, ``fit_end`` callbacks get
        ``reason='failed'`` and ``error``, the trainer stays at its last completed step, and
        ``fit()`` continues the run once the cause is fixed. The exception is re-raised.

        At an evaluation step the evaluation is recorded before the ``step_end`` callbacks run,
        so a checkpoint saved from any callback holds everything up to that step. Callbacks may
        read the trainer and call ``request_stop()``, ``reschedule()``, ``evaluate()``,
        ``state_dict()`` and ``save()``; ``fit``, ``step``, ``lr_find`` and ``load_state_dict``
        are refused while a fit runs (one at a time, from any thread).
        """
        with self.exclusive("fit"):
            return self._fit(epochs, steps, until, progress)

    def _fit(self, epochs, steps, until, progress) -> History:
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        end, target = self._plan(epochs, steps, until)
        self._check_last_batch(end - self.step_count)
        horizon = self._horizon if self._horizon is not None else end
        schedule = self._schedule if self._schedule is not None else self._build_schedule(horizon)
        check_warmup_fits(schedule.warmup_steps, horizon)   # a schedule built before the run's length was known
        # validated: commit the plan
        self._schedule, self._horizon = schedule, horizon
        self._plan_end, self._plan_until = end, target
        self._stop_requested = False
        self._interrupted = False
        self.error = None
        reset_peak_memory(self.device)
        # before the handler: if it fails, none is left installed; data-parallel, on rank 0 only (as prints are)
        bar = progress_bar(progress, end - self.step_count) if self.is_main_process else None
        if isinstance(bar, LabelledBar):
            bar.label(self)
        previous_handler = self._install_interrupt_handler()
        reason, error = "failed", None   # until the loop says otherwise
        try:
            self._trigger("fit_start", {})
            eval_every = self.config.eval_every
            can_eval = self._eval_data is not None
            if self._eval_pending and can_eval:
                self._record_eval()   # the last run stopped inside the evaluation of its last step
            self._eval_pending = False
            reason = None
            while self.step_count < end:
                if self._stop_requested and not self._dist.data_parallel:   # (data-parallel: agreed in the step)
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
                reached = target is not None and target.metric == "loss" and target.reached(row["loss"])
                # Evaluate at every eval_every steps (or epoch end), at the last step and where a loss
                # target is reached, before step_end: a checkpoint from any callback holds this row.
                due = (self.step_count % eval_every == 0) if eval_every else self.epoch != epoch_before
                if can_eval and (due or reached or self.step_count >= end):
                    self._eval_pending = True   # until recorded: a failure here leaves it for the next fit
                    ev = self._record_eval()
                    if target is not None and target.metric in ev and target.reached(ev[target.metric]):
                        reached = True
                if self._log is not None:
                    self._log.write(self.history)   # at most every few seconds
                self._trigger("step_end", row)
                if reached:
                    reason = "target"
                    break
            else:
                reason = "completed"
        except KeyboardInterrupt:
            reason = "interrupted"
            raise
        except DivergenceError:
            reason = "diverged"
            raise
        except BaseException as err:   # anything else: the run failed; it stays resumable
            reason, error = "failed", err
            self.error = err
            raise
        finally:
            if bar is not None:
                bar.close()
            self._restore_interrupt_handler(previous_handler)
            if reason in ("completed", "target"):
                self._plan_end = None
            if reason != "diverged":
                detail = "" if error is None else f"{type(error).__name__}: {error}"[:500]
                self.history.events.append({"step": self.step_count, "event": reason, "detail": detail})
            if target is not None:
                self.history.target = {"metric": target.metric, "value": target.value, "mode": target.mode,
                                       "reached": reason == "target", "step": self.step_count if reason == "target" else None}
            if self._log is not None:
                self._log.write(self.history, now=True)
            end_row = {"reason": reason} if error is None else {"reason": reason, "error": error}
            self._trigger("fit_end", end_row)
        if reason == "interrupted":
            raise KeyboardInterrupt(f"training interrupted after step {self.step_count}; "
                                    f"the trainer is consistent: call fit() to continue")
        return self.history
    def _plan(self, epochs, steps, until) -> tuple[int, Target | None]:
        given = [name for name, v in (("epochs", epochs), ("steps", steps)) if v is not None]
        check_length(epochs, steps)
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
            end = self.step_count + self._steps(steps, epochs, from_now=True)
        else:
            end = self.step_count + self._steps(None, DEFAULT_UNTIL_EPOCHS, from_now=True)
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
        The model is put in eval mode and restored afterwards; nothing is recorded. Refused from
        another thread while a fit or step runs (its eval mode would reach the training step);
        a callback may call it.
        """
        self._refuse_from_another_thread("evaluate")
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
        self._eval_pending = False   # recorded: a checkpoint from eval_end must not evaluate again
        if self._log is not None:
            self._log.write(self.history, now=True)
        if self._log_checkpoint is not None:
            self.save(self._log_checkpoint)   # every rank calls it; rank 0 writes
        self._trigger("eval_end", row)
        return row

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: model, optimizer, progress, history, RNG.

        As with ``nn.Module.state_dict``, the tensors are the live ones: ``copy.deepcopy`` the
        result to keep an in-memory snapshot while training goes on (``save`` writes a copy).
        Refused from another thread while a fit runs (it would catch a step half done); a
        callback may call it.
        """
        self._refuse_from_another_thread("state_dict")
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() or None,   # None (as ever) where the scaler is disabled
            "progress": {
                "step": self.step_count, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "example_in_epoch": self.example_in_epoch, "examples": self.examples_seen,
                "train_time": self.train_time, "data_seed": self._data_seed,
                "horizon": self._horizon, "plan_end": self._plan_end,
                "plan_until": dataclasses.asdict(self._plan_until) if self._plan_until else None,
                "eval_pending": self._eval_pending,
            },
            "history": self.history.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "data_spec": self.data_spec,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (model, optimizer, progress, history and RNG).

        The whole state is read and checked first: a state that does not fit (another model,
        a damaged history, missing progress) raises a ValueError and changes nothing.
        Refused while a fit or step runs (from a callback or another thread).
        """
        with self._hold("load_state_dict"):
            self._load_state(state)

    def snapshot(self) -> "TrainerSnapshot":
        """The whole training state, in memory, for ``restore``: try something, then come back exactly.

        It holds a copy of ``state_dict()`` (model, optimizer, loss scaler, progress and data
        position, History, random generators), the parameters' ``.grad``, every module's
        train/eval mode and the schedule. A live pass over a DataLoader is set aside untouched:
        steps after the snapshot read on from a fresh pass at the same position, and ``restore``
        hands the original back, so the run goes on as if the steps between had never been
        taken (bitwise on the CPU). Refused from another thread while a fit runs.

        Example:
            >>> import torch
            >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
            >>> t = Trainer(torch.nn.Linear(8, 3), (x, y), batch_size=16, lr=0.1, seed=0)
            >>> saved = t.snapshot()
            >>> _ = t.fit(steps=3, progress=False)
            >>> t.restore(saved)
            >>> t.step_count, len(t.history), saved
            (0, 0, TrainerSnapshot(step=0))
        """
        self._refuse_from_another_thread("snapshot")
        state = copy.deepcopy(self.state_dict())
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self._params]
        modes = [m.training for m in self.model.modules()]
        snap = TrainerSnapshot(self, state, grads, modes, self._schedule, self._batches)
        self._batches = None
        return snap

    def restore(self, snapshot: "TrainerSnapshot") -> None:
        """Put the trainer back exactly where ``snapshot()`` found it (see ``snapshot``).

        A snapshot can be restored more than once (the set-aside DataLoader pass comes back the
        first time; later restores read on from a fresh pass at the same position). Refused while
        a fit or step runs; a tool holding the trainer (``exclusive``) may call it.
        """
        if not isinstance(snapshot, TrainerSnapshot):
            raise TypeError(f"snapshot must come from Trainer.snapshot(), got {type(snapshot).__name__}")
        if snapshot.trainer is not self:
            raise ValueError("snapshot: it was taken of another trainer; restore it there (or use state_dict and "
                             "load_state_dict to move a state between trainers)")
        with self._hold("restore"):
            self._load_state(copy.deepcopy(snapshot.state))   # a copy: the snapshot stays as it was
            for p, g in zip(self._params, snapshot.grads):
                p.grad = None if g is None else g.clone()
            for module, training in zip(self.model.modules(), snapshot.modes):
                module.training = training
            self._schedule = snapshot.schedule
            self._batches, snapshot.batches = snapshot.batches, None

    def _load_state(self, state: Mapping[str, Any]) -> None:
        # ---- parse and check everything; nothing below this block may fail on the state's content
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from Trainer.state_dict, got {type(state).__name__}")
        missing = {"model", "optimizer", "progress", "history"} - set(state)
        if missing:
            raise ValueError(f"state is not an nbbatch trainer state: missing {sorted(missing)}")
        version = state.get("version", CHECKPOINT_VERSION)
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise ValueError(f"state has version {version!r}; this nbbatch reads up to {CHECKPOINT_VERSION}")
        p = state["progress"]
        if not isinstance(p, Mapping):
            raise ValueError("state['progress'] must be a dict")
        counts = ("step", "epoch", "batch_in_epoch", "examples", "data_seed")
        absent = [k for k in (*counts, "train_time", "horizon", "plan_end") if k not in p]
        if absent:
            raise ValueError(f"state['progress'] lacks {absent}; it was not written by Trainer.state_dict")
        bad = [k for k in counts if isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 0]
        bad += [k for k in ("horizon", "plan_end") if p[k] is not None and (not isinstance(p[k], int) or p[k] < 0)]
        if isinstance(p["train_time"], bool) or not isinstance(p["train_time"], (int, float)):
            bad.append("train_time")
        if bad:
            raise ValueError(f"state['progress']: {[(k, p[k]) for k in bad]} are not valid counts")
        position = resume_position(self._train, p, self.config.batch_size)   # (batch, example) in the saved epoch
        epoch_steps = self._train.steps_in_epoch(p["epoch"])
        if position is None or position[0] >= epoch_steps:
            raise ValueError(f"state['progress']: batch_in_epoch={p['batch_in_epoch']}, example_in_epoch="
                             f"{p.get('example_in_epoch')} but epoch {p['epoch']} of this trainer has {epoch_steps} "
                             f"batches of {self._train.n} examples; load it into the run it was saved from")
        try:
            plan_until = Target(**p["plan_until"]) if p.get("plan_until") else None
            history = History()
            history.load_state_dict(state["history"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"state: its progress or history is damaged ({type(err).__name__}: {err})") from None
        if len(history.steps) and history.steps["step"][-1] != p["step"]:
            raise ValueError(f"state: its history ends at step {history.steps['step'][-1]} but its progress is at "
                             f"step {p['step']}")
        # Module.load_state_dict copies the tensors that fit before it reports those that do not:
        # check every name and shape first, so a state for another model changes nothing.
        current, saved = self.model.state_dict(), state["model"]
        if not isinstance(saved, Mapping):
            raise ValueError("state['model'] must be a model's state_dict")
        wrong = sorted(set(current) ^ set(saved)) + [
            k for k in current if k in saved and getattr(saved[k], "shape", None) != getattr(current[k], "shape", None)]
        if wrong:
            raise ValueError(f"state: its model does not fit this trainer's model (names or shapes differ at "
                             f"{wrong[:5]}); load it into the model it was saved from")
        opt = state["optimizer"]
        groups = opt.get("param_groups") if isinstance(opt, Mapping) else None
        if (not isinstance(groups, list) or not isinstance(opt.get("state"), Mapping)
                or [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]):
            raise ValueError("state['optimizer'] does not fit this trainer's optimizer (its parameter groups differ)")
        # Per-parameter buffers (momentum, Adam's moments) must have their parameter's shape, or the
        # next step fails (or broadcasts silently) after everything was loaded.
        shapes = {i: p.shape for i, p in enumerate(self._params)}
        for key, entry in opt["state"].items():
            shape = shapes.get(key) if isinstance(key, int) else None
            if shape is None or not isinstance(entry, Mapping):
                raise ValueError(f"state['optimizer']: its state for parameter {key!r} fits no parameter of this trainer")
            odd = [name for name, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != shape]
            if odd:
                raise ValueError(f"state['optimizer']: {odd} of parameter {key} have a shape other than the "
                                 f"parameter's {tuple(shape)}")
        rng = state.get("rng") or {}
        reference = torch.get_rng_state()
        cpu_rng = rng.get("torch") if isinstance(rng, Mapping) else None
        if cpu_rng is not None and not (isinstance(cpu_rng, torch.Tensor) and cpu_rng.dtype == torch.uint8
                                        and cpu_rng.shape == reference.shape):
            raise ValueError("state['rng']['torch'] is not a CPU generator state")
        scaler = state.get("scaler")
        if scaler is not None and not isinstance(scaler, Mapping):
            raise ValueError("state['scaler'] must be a GradScaler state_dict or None")

        # ---- apply (the optimizer first: it checks itself; should the model still fail, undo it)
        before = copy.deepcopy(self.optimizer.state_dict())
        self.optimizer.load_state_dict(opt)
        try:
            self.model.load_state_dict(saved)
        except BaseException:
            self.optimizer.load_state_dict(before)
            raise
        if scaler:
            self.scaler.load_state_dict(scaler)   # a disabled scaler ignores it
        self.step_count, self.epoch = p["step"], p["epoch"]
        self.batch_in_epoch, self.example_in_epoch = position
        self.examples_seen, self.train_time = p["examples"], p["train_time"]
        self._data_seed = p["data_seed"]
        self._train.seed = p["data_seed"]
        self._horizon, self._plan_end = p["horizon"], p["plan_end"]
        self._plan_until = plan_until
        self._eval_pending = bool(p.get("eval_pending", False))
        self._schedule = None
        self._current_lr = None
        self._batches = None
        self.history = history
        self._noise.rebuild(self.history.steps)
        if cpu_rng is not None:
            torch.set_rng_state(cpu_rng.cpu())
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (a temporary file renamed into place).

        Data-parallel, rank 0 writes and the other ranks return at once, so calling it on every
        rank and calling it on rank 0 alone both work; ``Trainer.load`` waits for all ranks
        before it reads, so a file saved just before is complete.
        """
        self._refuse_from_another_thread("save")   # it would catch a step half done
        if not self._dist.is_main:
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
             log_dir: str | os.PathLike | None = None, log_checkpoints: bool = False,
             **overrides) -> "Trainer":
        """Rebuild a trainer from a checkpoint written by ``save`` and continue with ``fit()``.

        The checkpoint is read with ``weights_only=True``: a file that would run code when
        unpickled is refused. ``data`` may be left out when the run used a built-in dataset.
        Options that were custom callables (optimizer factory, loss, metrics) must be passed again.
        A data-parallel run resumes on any number of processes (every rank reads the file).
        ``log_dir`` (and ``log_checkpoints``) start a run log (see ``Trainer``) holding the
        checkpoint's History and what follows.
        """
        ctx = resolve_distributed(distributed)
        if ctx is not None:
            ctx.barrier()   # rank 0 may have just written the file
        state = read_checkpoint(path)
        if not isinstance(state.get("config"), Mapping):
            raise ValueError(f"{os.fspath(path)!r}: the checkpoint has no config, so Trainer.load cannot rebuild "
                             f"the trainer; build it with Trainer(model, data, ...) and call "
                             f"load_state_dict(nbbatch.trainer.read_checkpoint(path))")
        try:
            cfg = TrainConfig.from_dict(state["config"], **overrides)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{os.fspath(path)!r}: the checkpoint's config cannot be used: {err}") from err
        if data is None:
            spec = state.get("data_spec")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("kwargs", {}), Mapping):
                raise ValueError(f"{os.fspath(path)!r}: the checkpoint's data was not a built-in dataset: pass "
                                 f"data=... to Trainer.load")
            # A checkpoint names the data, not where it is kept: the dataset is read (or made) in
            # this user's cache, never in a directory the file names.
            kwargs = {k: v for k, v in (spec.get("kwargs") or {}).items() if k != "cache_dir"}
            data = load_dataset({**spec, "kwargs": kwargs})
        trainer = cls(model, data, cfg, eval_data=eval_data, distributed=distributed, log_dir=log_dir,
                      log_checkpoints=log_checkpoints)
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
            >>> p = plan(64, max_micro_batch=16, lr=0.1, base_batch_size=32)
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
            cfg = cfg.replace(batch_size=plan.batch_size)
        return cls(model, data, cfg, eval_data=eval_data, distributed=distributed)

    def __repr__(self) -> str:
        c = self.config
        return (f"Trainer(batch_size={c.batch_size}, lr={self.peak_lr:.4g}, optimizer={c.optimizer!r}, "
                f"accumulate={c.accumulate}, precision={self.precision!r}, device={str(self.device)!r}, "
                f"step={self.step_count}, epoch={self.epoch})")
