"""Large-batch optimizers torch.optim lacks (LARS, LAMB) and gradient-noise injection.

Written by hand because torch ships neither optimizer; both follow the update rules of their
papers line by line (see each class), so the tests can check them against hand-computed steps.

- LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"): SGD with
  momentum whose step is scaled, per layer (per parameter tensor), by the trust ratio
  ``eta * |w| / (|g| + weight_decay * |w|)``.
- LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
  minutes"): the Adam direction with decoupled weight decay, rescaled per layer so that its norm
  is ``lr * |w|``.
- ``layerwise_groups``: the parameter groups the Trainer uses for both by name: weight matrices
  and kernels adapted and weight-decayed, 1-D tensors (biases, norm weights) neither, as the
  papers' implementations do.
- Gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very
  Deep Networks"): Gaussian noise of variance ``eta / (1 + t)**gamma`` added to each gradient.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["LARS", "LAMB", "layerwise_groups", "add_gradient_noise", "gradient_noise_std"]

#: LAMB's eps when none is given: the paper's BERT runs and the reference implementations
#: (NVIDIA's FusedLAMB, torch-optimizer, timm) use 1e-6. Adam's 1e-8 would let ``r = m/(sqrt(v)+eps)``
#: of a coordinate with a tiny gradient grow towards ``sign(g)``, which the layer-wise rescaling
#: then spreads over the whole layer's step.
LAMB_EPS = 1e-6


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = True) -> None:
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


def layerwise_groups(params: Iterable, weight_decay: float = 0.0, adapt_all: bool = False) -> list[dict]:
    """Parameter groups for LARS/LAMB as the large-batch papers' implementations use them.

    Tensors with two or more dimensions (weight matrices, convolution kernels) get the layer-wise
    trust ratio and weight decay; 1-D tensors and scalars (biases, batch/layer-norm weights and
    shifts) get neither: ``adapt=False`` (a plain SGD-momentum or AdamW step) and
    ``weight_decay=0`` (You et al.'s LARS and LAMB code, and Goyal et al. 2017 for weight decay).
    ``adapt_all=True`` puts every tensor in one adapted, weight-decayed group. Each group carries a
    ``"name"`` (``"adapted"`` or ``"1-d"``) so ``optimizer.param_groups`` shows the split; an empty
    group is left out.

    Args:
        params: parameters (tensors) in model order.
        weight_decay: the weight decay of the adapted group, >= 0.
        adapt_all: adapt and weight-decay every tensor.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> [(g["name"], len(g["params"]), g["adapt"], g["weight_decay"]) for g in layerwise_groups(model.parameters(), 1e-4)]
        [('adapted', 1, True, 0.0001), ('1-d', 3, False, 0.0)]
    """
    _check("weight_decay", weight_decay, 0.0)
    if not isinstance(adapt_all, bool):
        raise TypeError(f"adapt_all must be True or False, got {adapt_all!r}")
    params = list(params)
    if adapt_all:
        return [{"params": params, "name": "adapted", "adapt": True, "weight_decay": weight_decay}]
    groups = [{"params": [p for p in params if p.dim() >= 2], "name": "adapted", "adapt": True,
               "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "name": "1-d", "adapt": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), with momentum.

    For each parameter tensor ``w`` with gradient ``g`` (Algorithm 1 of the paper)::

        ratio = trust_coefficient * |w| / (|g| + weight_decay * |w|)     (1 if |w| or |g| is 0)
        v     = momentum * v + lr * ratio * (g + weight_decay * w)
        w     = w - v

    The momentum buffer holds the learning rate (``v = lr * u``), as in the paper. A parameter
    group with ``adapt=False`` (biases and norm layers, commonly) takes plain SGD steps:
    ``ratio = 1``.

    Args:
        params: parameters or parameter groups.
        lr: global learning rate (the paper's gamma_t, schedule it as usual).
        momentum: in [0, 1).
        weight_decay: L2 coefficient beta >= 0, also used in the trust ratio.
        trust_coefficient: eta > 0, the paper uses 0.001.
        eps: added to the denominator of the ratio for numerical safety (default 0: exact formula).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))         # |w| = 5
        >>> opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1)
        >>> w.grad = torch.tensor([0.0, 1.0])                        # |g| = 1
        >>> opt.step()                                              # ratio = 0.1 * 5 / 1 = 0.5
        >>> w.detach()
        tensor([3.0000, 3.5000])
    """

    def __init__(self, params: Iterable, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0):
        _check("lr", lr, 0.0)
        _check("momentum", momentum, 0.0, 1.0)
        _check("weight_decay", weight_decay, 0.0)
        _check("trust_coefficient", trust_coefficient, 0.0, low_open=True)
        _check("eps", eps, 0.0)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` re-evaluates the loss as for any torch optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # Multi-tensor (foreach) kernels, as torch.optim.SGD uses: one call for all layers.
            d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else torch._foreach_mul(grads, 1.0)
            if group["adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))      # (layers,)
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(d, (ratio * lr).to(d[0].dtype).unbind())   # the paper's local lr * (g + beta w)
            else:
                torch._foreach_mul_(d, lr)
            if mom != 0:
                bufs, fresh = [], []
                for p, dp in zip(params, d):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = dp           # v_1 = local lr * direction
                        fresh.append(dp)
                    else:
                        bufs.append(state["momentum_buffer"])
                        fresh.append(None)
                if bufs:
                    old = [dp for dp, f in zip(d, fresh) if f is None]
                    torch._foreach_mul_(bufs, mom)
                    torch._foreach_add_(bufs, old)
                d = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_sub_(params, d)
        return loss


class LAMB(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019, Algorithm 2).

    For each parameter tensor ``w`` with gradient ``g``, at step ``t`` (from 1)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        r = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)       (bias-corrected Adam)
        u = r + weight_decay * w
        w = w - lr * phi(|w|) / |u| * u                                   (ratio 1 if a norm is 0)

    with ``phi(z) = min(z, max_trust)`` (``max_trust=None``: ``phi(z) = z``, as in the paper).
    ``bias_correction=False`` drops the two ``1 - beta**t`` factors. A group with
    ``adapt=False`` takes the plain AdamW step ``lr * u``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: (beta1, beta2), each in [0, 1).
        eps: > 0, added to sqrt(v); default 1e-6 (``LAMB_EPS``: the paper's and reference code's value).
        weight_decay: decoupled weight decay lambda >= 0.
        max_trust: clamp of phi(|w|) (> 0), or None.
        bias_correction: apply Adam's bias correction.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))          # |w| = 5
        >>> opt = LAMB([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -1.0])                        # first step: r = sign(g)
        >>> opt.step()                                               # step = 0.1 * 5 / sqrt(2) * r
        >>> [round(x, 4) for x in w.tolist()]
        [2.6464, 4.3536]
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = LAMB_EPS,
                 weight_decay: float = 0.0, max_trust: float | None = None, bias_correction: bool = True):
        _check("lr", lr, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps, 0.0, low_open=True)
        _check("weight_decay", weight_decay, 0.0)
        if max_trust is not None:
            _check("max_trust", max_trust, 0.0, low_open=True)
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be True or False, got {bias_correction!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_trust=max_trust,
                        bias_correction=bias_correction, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` re-evaluates the loss as for any torch optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            states = [self.state[p] for p in params]
            m = [st["exp_avg"] for st in states]
            v = [st["exp_avg_sq"] for st in states]
            # Multi-tensor (foreach) kernels, as torch.optim.Adam uses.
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            # r = (m / bc1) / (sqrt(v / bc2) + eps), computed as (m / (sqrt(v) / sqrt(bc2) + eps)) / bc1
            # to allocate two temporaries instead of four (as torch.optim.Adam does).
            denom = torch._foreach_sqrt(v)
            if group["bias_correction"]:
                torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** st["step"]) for st in states])
            torch._foreach_add_(denom, group["eps"])
            u = torch._foreach_div(m, denom)                         # the Adam direction r
            if group["bias_correction"]:
                torch._foreach_div_(u, [1 - beta1 ** st["step"] for st in states])
            if group["weight_decay"] != 0:
                torch._foreach_add_(u, params, alpha=group["weight_decay"])
            if group["adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))  # (layers,)
                u_norm = torch.stack(torch._foreach_norm(u))
                phi = w_norm if group["max_trust"] is None else w_norm.clamp(max=group["max_trust"])
                ratio = torch.where((w_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(u, (ratio * group["lr"]).to(u[0].dtype).unbind())
            else:
                torch._foreach_mul_(u, group["lr"])
            torch._foreach_sub_(params, u)
        return loss


def gradient_noise_std(step: int, eta: float, gamma: float = 0.55) -> float:
    """Standard deviation of the injected gradient noise at ``step`` (0-based): sqrt(eta / (1+t)^gamma).

    Neelakantan et al. (2015) use eta in {0.01, 0.3, 1.0} and gamma = 0.55.

    Args:
        step: optimizer steps already taken, t >= 0.
        eta: noise variance at step 0, >= 0.
        gamma: decay exponent, >= 0.

    Example:
        >>> gradient_noise_std(0, 0.01), round(gradient_noise_std(99, 0.01), 5)
        (0.1, 0.02818)
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    _check("eta", eta, 0.0)
    _check("gamma", gamma, 0.0)
    return math.sqrt(eta / (1.0 + step) ** gamma)


@torch.no_grad()
def add_gradient_noise(params: Iterable[torch.Tensor], std: float, generator: torch.Generator | None = None) -> None:
    """Add independent N(0, std^2) noise to every existing ``.grad`` in ``params`` (in place).

    Args:
        params: parameters whose ``.grad`` receives the noise (those without one are skipped).
        std: the noise's standard deviation, >= 0 (0 leaves the gradients untouched).
        generator: a ``torch.Generator`` on the gradients' device; default torch's global one.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(10000)); w.grad = torch.zeros(10000)
        >>> add_gradient_noise([w], 0.5, torch.Generator().manual_seed(0))
        >>> round(w.grad.std().item(), 1)
        0.5
    """
    _check("std", std, 0.0)
    if std == 0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.add_(torch.randn(p.grad.shape, generator=generator, device=p.grad.device,
                                    dtype=p.grad.dtype), alpha=std)
