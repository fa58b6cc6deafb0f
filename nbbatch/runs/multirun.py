"""MultiRun: R runs of one architecture trained in one vectorised step, one History per run.

It checks the options and builds the stacked runs, steps them (the forward engines in
``nbbatch.runs.engines``, the update rules in ``nbbatch.runs.optimizers``), freezes the runs that
diverge, stop or reach a target, evaluates them and tabulates their histories.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.func import stack_module_state

from ..batching import as_tensors, epoch_permutation, num_batches, train_tensors
from ..config import TrainConfig, check_length
from ..device import autocast_context, peak_memory_bytes, reset_peak_memory, resolve_device, resolve_precision
from ..history import History
from ..losses import accuracy, resolve_loss
from ..schedules import Schedule, check_warmup_fits, length_in_steps, scale_lr
from ..trainer import Target
from .engines import bmm_forward, check_same_architecture, probe, sequential_plan, stacked_losses, vmap_forward
from .optimizers import MULTIRUN_OPTIMIZERS, StackedOptimizer

__all__ = ["MultiRun", "PER_RUN_OPTIONS"]

PER_RUN_OPTIONS = ("seed", "lr", "momentum", "weight_decay", "scale_rule", "base_batch_size", "warmup",
                   "warmup_steps", "warmup_epochs", "warmup_start", "decay", "total_steps", "total_epochs",
                   "decay_steps", "decay_epochs", "decay_gamma", "min_lr_factor")
# Trainer options a MultiRun does not offer, with the value that means "off".
_UNSUPPORTED = {"accumulate": 1, "clip_grad_norm": None, "grad_noise": 0.0, "noise_scale_every": None,
                "checkpoint_segments": 0, "batch_schedule": None}
_DEFAULT_UNTIL_EPOCHS = 100


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


class MultiRun:
    """Train R runs of one architecture as one vectorised computation, one History per run.

    Args:
        model: a factory called once per run after ``torch.manual_seed(seed_r)`` (so a run's
            initial weights are those of ``torch.manual_seed(seed); model()``, as for a Trainer),
            or a list of R models of the same architecture (used as they are; copied).
        data: an ``nbbatch.data.DataBundle``, a pair ``(x, y)`` of tensors or a ``TensorDataset``.
        runs: the number of runs when neither a list of models nor a per-run list gives it.
        eval_data: evaluation data (default: a DataBundle's test split).
        config: a ``TrainConfig`` of shared defaults; keyword options override it.
        **options: ``TrainConfig`` fields. Those in ``PER_RUN_OPTIONS`` (seed, lr, momentum,
            weight_decay, scale_rule, warm-up and decay options) take one value for all runs or a
            list with one value per run; the others (batch_size, optimizer, betas, eps, precision,
            device, loss, metrics, eval_every, ...) are shared. ``optimizer`` is one of
            ``MULTIRUN_OPTIMIZERS``; accumulation, clipping, gradient noise, the online noise scale,
            activation checkpointing and fp16 are not offered.

    Each run ``r`` trains like ``Trainer(model_r, data, seed=seed_r, lr=lr_r, ...)``: the same
    batches (the same seeded epoch permutation), schedule and update rule, to float rounding
    (the batched products add in another order; the tests hold 1e-4 relative over 20 steps).
    Dropout draws different masks per run, but not the masks a lone Trainer would draw.

    Example:
        >>> from nbbatch import data, models
        >>> d = data.mnist1d(num_samples=1000)
        >>> mr = MultiRun(models.MLP, d, seed=[0, 1, 2], lr=[0.05, 0.05, 0.1], optimizer="momentum")
        >>> histories = mr.fit(epochs=1)                      # doctest: +SKIP
        >>> len(histories), mr.runs                            # doctest: +SKIP
        (3, 3)
    """

    def __init__(self, model, data, *, runs: int | None = None, eval_data=None, config: TrainConfig | None = None,
                 **options):
        # ---- validate everything before any state changes -----------------------------------
        if config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
            raise ValueError(f"runs must be a positive int, got {runs!r}")
        if _is_list(model):
            models = list(model)
            if not models:
                raise ValueError("model: the list of models is empty")
            for i, m in enumerate(models):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"model: entry {i} is a {type(m).__name__}, not a torch.nn.Module")
            factory = None
        elif isinstance(model, nn.Module):
            raise TypeError("model: give a factory (e.g. models.MLP or lambda: MyNet()) or a list of models, "
                            "not one model: each run needs its own weights")
        elif callable(model):
            models, factory = None, model
        else:
            raise TypeError(f"model must be a model factory or a list of models, got {type(model).__name__}")
        fields = {f for f in TrainConfig.__dataclass_fields__}
        unknown = set(options) - fields
        if unknown:
            raise TypeError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(fields)}")
        sizes = {}   # where the number of runs comes from
        if models is not None:
            sizes["model"] = len(models)
        if runs is not None:
            sizes["runs"] = runs
        for name, value in options.items():
            if name in PER_RUN_OPTIONS and _is_list(value):
                sizes[name] = len(value)
            elif name not in PER_RUN_OPTIONS and _is_list(value) and name != "betas":
                raise ValueError(f"{name} is shared by all runs: give one value, not {value!r} "
                                 f"(per-run options: {', '.join(PER_RUN_OPTIONS)})")
        if not sizes:
            raise ValueError("the number of runs is not given: pass runs=R, a list of models, or a per-run list "
                             "such as seed=[0, 1, 2]")
        R = next(iter(sizes.values()))
        for name, n in sizes.items():
            if n != R:
                first = next(iter(sizes))
                raise ValueError(f"{name}: {n} values but there are {R} runs (from {first}); give one value "
                                 f"per run")
        base_cfg = config if config is not None else TrainConfig()
        shared = {k: v for k, v in options.items() if not (k in PER_RUN_OPTIONS and _is_list(v))}
        configs = []
        for r in range(R):
            per = {k: v[r] for k, v in options.items() if k in PER_RUN_OPTIONS and _is_list(v)}
            try:
                configs.append(base_cfg.replace(**shared, **per))
            except (TypeError, ValueError) as err:
                bad = sorted(per)
                where = f"run {r} ({', '.join(f'{k}={per[k]!r}' for k in bad)})" if bad else "options"
                raise type(err)(f"{where}: {err}") from None
        cfg = configs[0]
        for name, off in _UNSUPPORTED.items():
            if getattr(cfg, name) != off:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is not offered by MultiRun; train such runs with "
                                 f"Trainer (leave {name} at {off!r})")
        if not isinstance(cfg.optimizer, str) or cfg.optimizer not in MULTIRUN_OPTIMIZERS:
            raise ValueError(f"optimizer={cfg.optimizer!r}: MultiRun offers {MULTIRUN_OPTIMIZERS}; "
                             f"use Trainer for the others")
        x, y = train_tensors(data)
        if eval_data is None and getattr(data, "x_test", None) is not None and len(data.x_test):
            eval_data = (data.x_test, data.y_test)   # a DataBundle's test split
        if cfg.batch_size > len(x):
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(x)} examples)")
        if eval_data is not None:
            eval_data = as_tensors(eval_data)
            if eval_data is None:
                raise TypeError("eval_data must be a pair (x, y) of tensors or a TensorDataset")
            if len(eval_data[0]) != len(eval_data[1]):
                raise ValueError(f"eval_data: {len(eval_data[0])} inputs but {len(eval_data[1])} labels")
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        if precision == "fp16":
            raise ValueError("precision='fp16' needs a loss scaler per run, which MultiRun does not offer; "
                             "use precision='bf16' or 'fp32'")
        loss_fn = resolve_loss(cfg.loss)
        metrics = dict(cfg.metrics) if cfg.metrics is not None else (
            {"accuracy": accuracy} if cfg.loss == "cross_entropy" else {})
        rng = torch.get_rng_state()   # building from a factory seeds the global generator: undone on an error
        try:
            if factory is not None:
                models = []
                for c in configs:
                    if c.seed is not None:
                        torch.manual_seed(c.seed)
                    m = factory()
                    if not isinstance(m, nn.Module):
                        raise TypeError(f"model: the factory returned {type(m).__name__}, not a torch.nn.Module")
                    models.append(m)
            else:
                models = [copy.deepcopy(m) for m in models]
            check_same_architecture(models)
            if not any(p.requires_grad for p in models[0].parameters()):
                raise ValueError("model has no parameters to train")
            base = copy.deepcopy(models[0]).to("meta")
            fast = sequential_plan(base)
            probe(base, models, loss_fn, cfg.loss, x[:2], y[:2], y)
        except BaseException:
            torch.set_rng_state(rng)
            raise

        # ---- build --------------------------------------------------------------------------
        self.runs = R
        self.configs = configs
        self.config = cfg
        self.device = device
        self.precision = precision
        self.loss_fn = loss_fn
        self.metrics = metrics
        self._autocast = autocast_context(precision, device)
        self._base = base
        self._fast = fast
        self.engine = "bmm" if fast is not None else "vmap"
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in params.items()}
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        self._plist = [p for p in self.params.values() if p.requires_grad]
        self.x, self.y = x.to(device), y.to(device)
        self.n = len(x)
        self._eval_data = eval_data
        self._eval_cache = None
        self.steps_per_epoch = num_batches(self.n, cfg.batch_size, cfg.drop_last)
        self.seeds = [c.seed if c.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()) for c in configs]
        if configs[0].seed is not None:
            torch.manual_seed(configs[0].seed)   # as a Trainer seeds the global generator (dropout)
        self.peak_lrs = [scale_lr(c.lr, c.batch_size, c.base_batch_size or c.batch_size, c.scale_rule) for c in configs]
        self.histories = [History() for _ in range(R)]
        self.status = ["active"] * R            # active, diverged, stopped or target
        self.step_count = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.examples_seen = [0] * R
        self.train_time = 0.0
        self._perm_epoch = None
        self._perms = None
        self._horizon: int | None = None
        self._schedules: list[Schedule] | None = None
        # The stacked tensors hold the live runs only, in the order of ``_live``; a run that stops or
        # diverges leaves the stack (its weights kept in ``_frozen``), so it costs nothing afterwards.
        self._live = list(range(R))
        self._frozen: dict[int, dict[str, torch.Tensor]] = {}
        self._optimizer = StackedOptimizer(cfg.optimizer, momentum=[c.momentum_value for c in configs],
                                           weight_decay=[c.weight_decay for c in configs], betas=cfg.betas,
                                           eps=cfg.eps, device=device)
        self._optimizer.bind(self._plist, self._live)
        self._reads_memory = device.type != "cpu"

    # ------------------------------------------------------------------ small public surface
    @property
    def diverged(self) -> list[bool]:
        """Per run: whether it diverged (and was frozen at its last finite step)."""
        return [s == "diverged" for s in self.status]

    @property
    def active(self) -> list[bool]:
        """Per run: whether it still trains."""
        return [s == "active" for s in self.status]

    def model(self, run: int) -> nn.Module:
        """Run ``run``'s model as a standalone ``nn.Module`` (a copy of its current weights, on the device)."""
        if isinstance(run, bool) or not isinstance(run, int) or not 0 <= run < self.runs:
            raise ValueError(f"run must be an int in [0, {self.runs - 1}], got {run!r}")
        m = copy.deepcopy(self._base).to_empty(device=self.device)
        if run in self._frozen:
            state = {k: v.clone() for k, v in self._frozen[run].items()}
        else:
            i = self._live.index(run)
            state = {k: v[i].detach().clone() for k, v in {**self.params, **self.buffers}.items()}
        m.load_state_dict(state)
        return m

    def stop_runs(self, runs: Sequence[int], reason: str = "stopped") -> None:
        """Freeze ``runs`` where they stand (their weights and history stay; the others go on)."""
        runs = list(runs)
        for r in runs:
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.runs:
                raise ValueError(f"runs: {r!r} is not a run index in [0, {self.runs - 1}]")
        if reason not in ("stopped", "target"):
            raise ValueError(f"reason must be 'stopped' or 'target', got {reason!r}")
        for r in runs:
            if self.status[r] == "active":
                self._freeze(r, reason, "")
        self._compact()

    @property
    def lrs(self) -> list[float]:
        """Each run's learning rate of the next step."""
        return [s(self.step_count) for s in self._get_schedules()]

    # ------------------------------------------------------------------ schedules
    def _steps(self, steps, epochs):
        return length_in_steps(steps, epochs, self.steps_per_epoch)

    def _build_schedules(self, horizon: int | None) -> list[Schedule]:
        out = []
        for c, peak in zip(self.configs, self.peak_lrs):   # the Trainer's rule, run by run
            warmup_steps = self._steps(c.warmup_steps, c.warmup_epochs) or 0
            start = c.warmup_start
            if start is None:
                k = peak / c.lr if c.lr > 0 else 1.0
                start = 1.0 / k if k > 1.0 else 0.1
            total = self._steps(c.total_steps, c.total_epochs) or horizon
            try:
                out.append(Schedule(peak, warmup=c.warmup, warmup_steps=warmup_steps if c.warmup != "none" else 0,
                                    warmup_start=start, decay=c.decay, total_steps=total,
                                    decay_steps=self._steps(c.decay_steps, c.decay_epochs),
                                    decay_gamma=c.decay_gamma, min_lr_factor=c.min_lr_factor))
            except ValueError as err:
                raise ValueError(f"run {len(out)}: {err}") from None
        return out

    def _get_schedules(self, horizon: int | None = None) -> list[Schedule]:
        if self._schedules is None:
            self._schedules = self._build_schedules(self._horizon if self._horizon is not None else horizon)
        return self._schedules

    # ------------------------------------------------------------------ the vectorised step
    def _batch(self):
        """Each run's next batch: inputs ``(R, B, ...)`` and targets ``(R, B, ...)``, by run's own permutation."""
        if self._perm_epoch != (self.epoch, len(self._live)):
            perms = torch.stack([epoch_permutation(self.n, self.seeds[r], self.epoch) for r in self._live])  # (A, n)
            self._perms = perms.to(self.device)
            self._perm_epoch = (self.epoch, len(self._live))
        B, i = self.config.batch_size, self.batch_in_epoch
        idx = self._perms[:, i * B:(i + 1) * B]                                       # (R, b)
        return self.x[idx], self.y[idx]

    def _forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """Outputs ``(A, N, ...)`` of the A live runs on ``x`` (``(A, N, ...)``, or ``(N, ...)`` shared by all)."""
        if self._fast is not None:
            return bmm_forward(self._fast, self.params, x, len(self._live), shared_input)
        return vmap_forward(self._base, self.params, self.buffers, x, shared_input)

    def _losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-run mean losses ``(R,)`` of outputs ``(R, b, C)`` against targets ``(R, b, ...)``."""
        return stacked_losses(self.loss_fn, out, y)

    def _train_step(self) -> None:
        t0 = time.perf_counter()
        live, step = list(self._live), self.step_count
        A = len(live)
        xb, yb = self._batch()                                          # 1. each live run's batch
        lrs = [self._schedules[r](step) for r in live]                   # 2. each run's scheduled lr
        self._optimizer.set_lrs(lrs)
        with self._autocast:                                            # 3. forward, all runs at once
            out = self._forward(xb)
            losses = self._losses(out, yb).float()                      # (A,)
        # 4. backward: the runs share nothing, so d(sum of losses)/d(run r's weights) is run r's gradient
        grads = list(torch.autograd.grad(losses.sum(), self._plist))
        # 5. a non-finite loss or gradient freezes that run (a gradient's per-run sum is non-finite when
        #    any of its entries is); one device sync for the losses and the flags together
        check = losses.detach() + torch.stack([g.reshape(A, -1).sum(1) for g in grads]).sum(0) * 0.0
        values = torch.cat([losses.detach(), check]).tolist()
        loss_values, finite = values[:A], [math.isfinite(v) for v in values[A:]]
        for i, r in enumerate(live):
            if not finite[i]:
                what = "loss" if not math.isfinite(loss_values[i]) else "gradient"
                self._freeze(r, "diverged", f"non-finite {what} (loss={loss_values[i]}) at lr={lrs[i]:.4g}")
        if not all(finite):
            grads = self._compact(grads)                                # the diverged runs leave before the update
        if self._live:                                                  # 6. the update, in place
            self._optimizer.step(grads, t=self.step_count + 1)          # every active run has taken t steps
        dt = time.perf_counter() - t0
        self.step_count += 1                                            # 7. record
        self.train_time += dt
        self.batch_in_epoch += 1
        n = xb.shape[1]
        epoch_progress = self.epoch + self.batch_in_epoch / self.steps_per_epoch
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        memory = peak_memory_bytes(self.device) if self._reads_memory else None
        for i, r in enumerate(live):
            if not finite[i]:
                continue
            self.examples_seen[r] += n
            self.histories[r].steps.append({
                "step": self.step_count, "epoch": epoch_progress, "examples": self.examples_seen[r],
                "loss": loss_values[i], "lr": lrs[i], "batch_size": n, "time": self.train_time,
                "examples_per_s": n / dt if dt > 0 else float("inf"), "peak_memory": memory})

    def _compact(self, grads: list[torch.Tensor] | None = None):
        """Drop the runs that are no longer active from the stacked tensors (and from ``grads``)."""
        keep = [i for i, r in enumerate(self._live) if self.status[r] == "active"]
        if len(keep) == len(self._live):
            return grads
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._live = [self._live[i] for i in keep]
        self.params = {k: v.detach()[idx].requires_grad_(v.requires_grad) for k, v in self.params.items()}
        self.buffers = {k: v[idx] for k, v in self.buffers.items()}
        self._plist = [p for p in self.params.values() if p.requires_grad]
        self._optimizer.keep(idx, self._plist, self._live)
        return None if grads is None else [g[idx] for g in grads]

    def _freeze(self, r: int, reason: str, detail: str) -> None:
        """Mark run ``r`` as no longer active and keep its weights; ``_compact`` then drops it from the stack."""
        self.status[r] = reason
        self.histories[r].events.append({"step": self.step_count, "event": reason, "detail": detail})
        i = self._live.index(r)
        self._frozen[r] = {k: v[i].detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    def step(self) -> list[dict | None]:
        """One vectorised step of every active run; each run's new history row (None: frozen)."""
        if not any(self.active):
            raise RuntimeError("every run has stopped or diverged: there is nothing to step")
        self._get_schedules(self._horizon)
        return self._train_step_rows()

    # ------------------------------------------------------------------ fit
    def fit(self, epochs: float | None = None, steps: int | None = None, until=None,
            on_step: Callable[["MultiRun", list], Any] | None = None) -> list[History]:
        """Train every run for ``epochs`` or ``steps`` more steps (or to ``until``); one History per run.

        ``until`` (as for ``Trainer.fit``: ``("eval_accuracy", 0.9)``, ``"loss<=0.5"``) freezes each
        run as it reaches the target while the others go on. A run that diverges is frozen at its
        last finite step and marked in ``status`` and its History's events; the fit goes on.
        ``on_step(multirun, rows)`` is called after every step with each run's new row (None for a
        frozen run); it may call ``stop_runs``. The fit ends early when no run is active.
        """
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable, got {type(on_step).__name__}")
        given = [n for n, v in (("epochs", epochs), ("steps", steps)) if v is not None]
        check_length(epochs, steps)
        target = Target.parse(until) if until is not None else None
        if target is not None:
            known = ["loss"] + (["eval_loss"] + [f"eval_{m}" for m in self.metrics] if self._eval_data else [])
            if target.metric not in known:
                raise ValueError(f"until: {target.metric!r} is not a recorded metric; recorded: {known}")
        if not given and target is None:
            raise ValueError("fit needs epochs=..., steps=... or until=...")
        end = self.step_count + (self._steps(steps, epochs) if given else _DEFAULT_UNTIL_EPOCHS * self.steps_per_epoch)
        horizon = self._horizon if self._horizon is not None else end
        schedules = self._schedules if self._schedules is not None else self._build_schedules(horizon)
        for r, s in enumerate(schedules):
            try:
                check_warmup_fits(s.warmup_steps, horizon)
            except ValueError as err:
                raise ValueError(f"run {r}: {err}") from None
        self._schedules, self._horizon = schedules, horizon
        reset_peak_memory(self.device)
        eval_every = self.config.eval_every
        can_eval = self._eval_data is not None
        last_eval = None
        while self.step_count < end and any(self.active):
            epoch_before = self.epoch
            rows = self._train_step_rows()
            if target is not None and target.metric == "loss":
                hit = [r for r, row in enumerate(rows) if row is not None and target.reached(row["loss"])]
                self._reach(hit)
            due = (self.step_count % eval_every == 0) if eval_every else self.epoch != epoch_before
            if due and can_eval and any(self.active):
                self._record_evals(target)
                last_eval = self.step_count
            if on_step is not None:
                on_step(self, rows)
        if can_eval and last_eval != self.step_count:
            self._record_evals(target, only_active=False, step=self.step_count)
        for r, h in enumerate(self.histories):
            if self.status[r] == "active":
                h.events.append({"step": self.step_count, "event": "completed", "detail": ""})
        return self.histories

    def _train_step_rows(self):
        before = [len(h.steps) for h in self.histories]
        self._train_step()
        return [h.steps.last() if len(h.steps) > b else None for h, b in zip(self.histories, before)]

    def _reach(self, runs):
        for r in runs:
            self._freeze(r, "target", "")
        self._compact()

    def _record_evals(self, target, only_active=True, step=None):
        results = self.evaluate(runs=[r for r in range(self.runs) if not only_active or self.status[r] == "active"])
        hit = []
        for r, ev in enumerate(results):
            h = self.histories[r]
            if ev is None:
                continue
            if not only_active and len(h.evals) and h.evals["step"][-1] == len(h.steps):
                continue   # this run's last evaluation is already at its last step
            row = {"step": len(h.steps), "epoch": h.steps["epoch"][-1] if len(h.steps) else 0.0,
                   "examples": self.examples_seen[r], "time": self.train_time}
            row.update({f"eval_{k}": v for k, v in ev.items()})
            h.evals.append(row)
            if target is not None and self.status[r] == "active" and target.metric in row \
                    and target.reached(row[target.metric]):
                hit.append(r)
        self._reach(hit)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data=None, runs: Sequence[int] | None = None) -> list[dict[str, float] | None]:
        """Each run's loss and metrics on ``data`` (default the evaluation set; ``"train"``, or ``(x, y)``).

        ``runs`` limits the evaluation to those run indices (the others' entries are None).
        """
        wanted = set(range(self.runs)) if runs is None else set(runs)
        if not wanted <= set(range(self.runs)):
            raise ValueError(f"runs: {sorted(wanted - set(range(self.runs)))} are not run indices in [0, {self.runs - 1}]")
        if data is None or (isinstance(data, str) and data == "eval"):
            if self._eval_data is None:
                raise ValueError("evaluate: there is no evaluation data; pass eval_data= or evaluate(data=(x, y))")
            if self._eval_cache is None:
                self._eval_cache = tuple(t.to(self.device) for t in self._eval_data)
            x, y = self._eval_cache
        elif isinstance(data, str):
            if data != "train":
                raise ValueError(f"evaluate: data={data!r} is not known; use 'train', 'eval' or (x, y)")
            x, y = self.x, self.y
        else:
            xy = as_tensors(data)
            if xy is None:
                raise TypeError("evaluate: data must be 'train', 'eval' or a pair (x, y) of tensors")
            x, y = xy[0].to(self.device), xy[1].to(self.device)
        if len(x) == 0:
            raise ValueError("evaluate: the evaluation data is empty")
        names = ["loss", *self.metrics]
        # eval_batch_size bounds the rows in flight across all live runs, as it bounds one Trainer's
        bs = max(1, self.config.eval_batch_size // max(1, len(wanted & set(self._live))))
        results: list = [None] * self.runs

        def row(out, yb):   # loss and metrics are any callables: run by run
            vals = [self.loss_fn(out, yb)] + [fn(out, yb) for fn in self.metrics.values()]
            return torch.stack([torch.as_tensor(v, device=self.device).float() for v in vals]) * len(yb)

        if wanted & set(self._live):
            self._base.eval()
            try:
                totals = None
                for i in range(0, len(x), bs):
                    xb, yb = x[i:i + bs], y[i:i + bs]
                    with self._autocast:
                        out = self._forward(xb, shared_input=True)                   # (A, n, ...)
                        block = torch.stack([row(o, yb) for o in out])               # (A, 1 + metrics)
                    totals = block if totals is None else totals + block
            finally:
                self._base.train()
            for r, means in zip(self._live, (totals / len(x)).tolist()):
                if r in wanted:
                    results[r] = dict(zip(names, means))
        for r in sorted(wanted & set(self._frozen)):   # runs that left the stack: one by one, as a Trainer evaluates
            m = self.model(r).eval()
            total = None
            for i in range(0, len(x), bs):
                with self._autocast:
                    part = row(m(x[i:i + bs]), y[i:i + bs])
                total = part if total is None else total + part
            results[r] = dict(zip(names, (total / len(x)).tolist()))
        return results

    # ------------------------------------------------------------------ tables
    def hyperparameters(self) -> list[dict]:
        """One dict per run: run, seed, lr (the configured value), peak_lr (after scaling), momentum, weight_decay."""
        return [{"run": r, "seed": self.seeds[r], "lr": c.lr, "peak_lr": self.peak_lrs[r],
                 "momentum": c.momentum_value, "weight_decay": c.weight_decay} for r, c in enumerate(self.configs)]

    def table(self, kind: str = "steps"):
        """All runs' ``steps`` (or ``evals``) rows in one pandas DataFrame, with each run's hyperparameters."""
        if kind not in ("steps", "evals"):
            raise ValueError(f"kind must be 'steps' or 'evals', got {kind!r}")
        import pandas as pd

        frames = []
        for hp, h in zip(self.hyperparameters(), self.histories):
            df = h.to_pandas(kind)
            for k, v in hp.items():
                df.insert(list(hp).index(k), "run_lr" if k == "lr" else k, v)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def summary(self):
        """One row per run: hyperparameters, status, steps, last loss and last evaluation (pandas)."""
        import pandas as pd

        rows = []
        for hp, h, s in zip(self.hyperparameters(), self.histories, self.status):
            row = dict(hp, status=s, steps=len(h.steps), loss=h.steps["loss"][-1] if len(h.steps) else None)
            last = h.evals.last()
            if last:
                row.update({k: v for k, v in last.items() if k.startswith("eval_")})
            rows.append(row)
        return pd.DataFrame(rows).set_index("run")

    def __repr__(self) -> str:
        return (f"MultiRun(runs={self.runs}, engine={self.engine!r}, batch_size={self.config.batch_size}, "
                f"optimizer={self.config.optimizer!r}, step={self.step_count}, "
                f"active={sum(self.active)}, diverged={sum(self.diverged)})")
