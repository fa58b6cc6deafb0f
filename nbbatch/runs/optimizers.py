"""The per-run update rules of a MultiRun: SGD, momentum, Nesterov, Adam and AdamW over stacked tensors.

Each parameter is stacked along a leading run dimension ``(R, ...)``; learning rate, momentum and
weight decay differ by run, as ``(R, 1, ...)`` views. torch.optim keeps one hyperparameter per group
and cannot take a per-row one, so the rules are written by hand with ``torch._foreach`` ops,
following torch.optim's single-tensor formulas.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..optim import ADAM_EPS

__all__ = ["MULTIRUN_OPTIMIZERS", "StackedOptimizer"]

MULTIRUN_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


class StackedOptimizer:
    """torch.optim's update rules over stacked ``(R, ...)`` parameters, with per-run hyperparameters.

    Args:
        optimizer: One of :data:`MULTIRUN_OPTIMIZERS`.
        momentum: Each run's momentum (a list indexed by run; SGD-family rules).
        weight_decay: Each run's weight decay (decoupled for ``"adamw"``).
        betas, eps: Adam's, shared by the runs (``eps=None``: the project's ``ADAM_EPS``).
        device: Where the hyperparameter tensors live.

    :meth:`bind` points it at the live runs' stacked parameters, :meth:`keep` drops runs (and their
    state) from the stack, :meth:`set_lrs` sets the live runs' learning rates, :meth:`step` updates
    the parameters in place.

    Example:
        >>> p = torch.ones(2, 3)                               # 2 runs of a 3-vector
        >>> opt = StackedOptimizer("sgd", momentum=[0.0, 0.0], weight_decay=[0.0, 0.0], device="cpu")
        >>> opt.bind([p], live=[0, 1]); opt.set_lrs([0.1, 0.5])
        >>> opt.step([torch.ones(2, 3)], t=1); p[:, 0].tolist()
        [0.8999999761581421, 0.5]
    """

    def __init__(self, optimizer: str, momentum: Sequence[float], weight_decay: Sequence[float],
                 betas: Sequence[float] = (0.9, 0.999), eps: float | None = None, device="cpu") -> None:
        if optimizer not in MULTIRUN_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {MULTIRUN_OPTIMIZERS}, got {optimizer!r}")
        if len(momentum) != len(weight_decay):
            raise ValueError(f"momentum and weight_decay need one value per run, got {len(momentum)} and "
                             f"{len(weight_decay)}")
        self.optimizer = optimizer
        self.device = device
        self._momentum_all = list(momentum)
        self._wd_all = list(weight_decay)
        self._uses_momentum = any(m > 0 for m in self._momentum_all)
        self._uses_decay = any(w > 0 for w in self._wd_all)
        self._nesterov = optimizer == "nesterov"
        self._adam = optimizer in ("adam", "adamw")
        self._betas = tuple(float(b) for b in betas)
        self._eps = ADAM_EPS if eps is None else float(eps)
        self._params: list[torch.Tensor] = []
        self._live: list[int] = []
        self._state: list[dict] = []
        self._lr = torch.zeros(len(self._momentum_all), device=device)
        self._lr_values: list[float] | None = None
        self._neg_lr_views = None

    def bind(self, params: list[torch.Tensor], live: list[int]) -> None:
        """Update ``params`` (stacked, one row per run of ``live``, in that order) from now on."""
        if not self._state:
            self._state = [{} for _ in params]
        self._params, self._live = params, list(live)
        self._live_hyperparameters()

    def keep(self, idx: torch.Tensor, params: list[torch.Tensor], live: list[int]) -> None:
        """Keep the rows ``idx`` of the stack (its state and learning rates too); ``params`` and ``live`` are the kept ones."""
        self._params, self._live = params, list(live)
        self._state = [{k: v[idx] for k, v in st.items()} for st in self._state]
        self._lr = self._lr[idx]
        self._lr_values = None
        self._neg_lr_views = self._views(-self._lr)
        self._live_hyperparameters()

    def set_lrs(self, lrs: list[float]) -> None:
        """The live runs' learning rates of the next step (in the order of ``live``)."""
        if lrs != self._lr_values:
            self._lr = torch.tensor(lrs, dtype=torch.float32, device=self.device)
            self._lr_values = lrs
            self._neg_lr_views = self._views(-self._lr)

    def _live_hyperparameters(self) -> None:
        """The (A,) hyperparameter tensors of the live runs and their broadcast views."""
        tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=self.device)   # noqa: E731
        self._momentum = tensor([self._momentum_all[r] for r in self._live])
        self._wd = tensor([self._wd_all[r] for r in self._live])
        self._mom_views = self._views(self._momentum)
        self._wd_views = self._views(self._wd)

    def _views(self, v: torch.Tensor):
        return [v.view((len(self._live),) + (1,) * (p.dim() - 1)) for p in self._params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], t: int) -> None:
        """One update of every bound parameter from ``grads``; ``t`` counts the steps taken, this one included."""
        params, neg_lr, wd, decay = self._params, self._neg_lr_views, self._wd_views, self._uses_decay
        if not self._adam:
            if decay:                                                   # g <- g + wd * p
                grads = torch._foreach_addcmul(grads, params, wd)
            if self._uses_momentum:
                mom = self._mom_views
                bufs = [s.get("momentum_buffer") for s in self._state]
                if bufs[0] is None:                                     # torch: the first buffer is the gradient
                    bufs = [g.clone() for g in grads]
                    for s, b in zip(self._state, bufs):
                        s["momentum_buffer"] = b
                else:                                                   # buf <- m * buf + g
                    torch._foreach_mul_(bufs, mom)
                    torch._foreach_add_(bufs, grads)
                grads = torch._foreach_addcmul(grads, bufs, mom) if self._nesterov else bufs
            torch._foreach_addcmul_(params, grads, neg_lr)              # p <- p - lr * g
            return
        beta1, beta2 = self._betas
        eps = self._eps
        if self.optimizer == "adamw":
            if decay:                                                   # p <- p * (1 - lr * wd)
                torch._foreach_mul_(params, torch._foreach_add(torch._foreach_mul(neg_lr, wd), 1.0))
        elif decay:
            grads = torch._foreach_addcmul(grads, params, wd)
        if "exp_avg" not in self._state[0]:
            for s, p in zip(self._state, params):
                s["exp_avg"] = torch.zeros_like(p)
                s["exp_avg_sq"] = torch.zeros_like(p)
        m = [s["exp_avg"] for s in self._state]
        v = [s["exp_avg_sq"] for s in self._state]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        bias1, bias2_sqrt = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        step = torch._foreach_div(m, denom)
        torch._foreach_mul_(step, [s / bias1 for s in neg_lr])
        torch._foreach_add_(params, step)
