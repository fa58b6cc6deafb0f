"""The two forward engines of a MultiRun, and the checks and plans that choose between them.

* batched products: an ``nn.Sequential`` of ``Linear``, ``Flatten``, elementwise activations and
  ``Dropout`` (``models.MLP``) runs as batched matrix products (``torch.baddbmm``) on the stacked
  weights (:func:`sequential_plan`, :func:`bmm_forward`);
* vmap: any other model runs through ``torch.func.vmap`` over ``functional_call``
  (:func:`vmap_forward`), after :func:`probe` has shown that it vectorises.

The batched products are about 1.3-1.5x faster than vmap for the MLP (``bench/RESULTS.md``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["ELEMENTWISE", "bmm_forward", "check_same_architecture", "probe", "sequential_plan", "stacked_losses",
           "vmap_forward"]

ELEMENTWISE = (nn.Identity, nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.Dropout)


def bmm_forward(plan: list, params: dict[str, torch.Tensor], x: torch.Tensor, runs: int,
                shared_input: bool = False) -> torch.Tensor:
    """Outputs ``(R, N, ...)`` of the ``runs`` stacked models on ``x`` by batched matrix products.

    ``plan`` comes from :func:`sequential_plan`; ``params`` holds the stacked ``(R, ...)`` weights by
    name; ``x`` is ``(R, N, ...)``, or ``(N, ...)`` shared by all runs when ``shared_input``.

    Example:
        >>> base = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> models = [nn.Sequential(nn.Linear(3, 2), nn.ReLU()) for _ in range(4)]
        >>> params, _ = stack_module_state(models)
        >>> x = torch.randn(5, 3)
        >>> out = bmm_forward(sequential_plan(base), params, x, 4, shared_input=True)
        >>> out.shape, torch.allclose(out[2], models[2](x), atol=1e-6)
        (torch.Size([4, 5, 2]), True)
    """
    R = runs
    # Activations travel transposed, (R, features, rows), between linear layers: then
    # out^T = W h^T + b and autograd's weight gradient grad^T h comes out (R, out, in),
    # contiguous like the weight, so the update's foreach kernels take their fast path.
    # A shared input (evaluation) stays unbatched until the first linear layer, which then
    # runs as one matrix product of all runs' stacked weights: (R*out, in) @ (in, rows).
    h, shared, transposed = x, shared_input, False
    for kind, name, module in plan:
        if kind == "linear":
            w, b = params[name + ".weight"], params.get(name + ".bias")
            if shared:
                lead = (R,) + h.shape[:-1]                                      # (R, N, ...)
                flat = h.reshape(-1, h.shape[-1]).T                             # (in, rows)
                h = (w.reshape(-1, w.shape[2]) @ flat).view(R, w.shape[1], -1)  # (R, out, rows)
                if b is not None:
                    h = h + b.unsqueeze(2)
                shared, transposed = False, True
                continue
            if not transposed:
                lead = h.shape[:-1]                                             # (R, N, ...)
                h = h.reshape(R, -1, h.shape[-1]).transpose(1, 2)               # (R, in, rows)
                transposed = True
            h = torch.bmm(w, h) if b is None else torch.baddbmm(b.unsqueeze(2), w, h)   # (R, out, rows)
        elif kind == "flatten":
            if transposed:
                h, transposed = h.transpose(1, 2).reshape(*lead, -1), False
            h = h.flatten(1 if shared else 2)
        else:                                                                   # elementwise
            h = module(h)
    if shared:   # no linear layer: every run's output is the same function of x
        return h.unsqueeze(0).expand(R, *h.shape)
    if transposed:   # back to (R, N, ..., out), contiguous for the loss's row-wise kernels
        h = h.transpose(1, 2).contiguous().view(*lead, h.shape[1])
    return h


def vmap_forward(base: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                 shared_input: bool = False) -> torch.Tensor:
    """Outputs ``(R, N, ...)`` of ``base`` with each run's stacked ``params`` and ``buffers``, through ``vmap``."""
    fn = lambda p, b, xi: functional_call(base, (p, b), (xi,))               # noqa: E731
    return vmap(fn, in_dims=(0, 0, None if shared_input else 0), randomness="different")(params, buffers, x)


def stacked_losses(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-run mean losses ``(R,)`` of outputs ``(R, b, C)`` against targets ``(R, b, ...)``."""
    if loss_fn is F.cross_entropy and out.dim() == 3 and y.dim() == 2:
        R, b, C = out.shape
        return F.cross_entropy(out.reshape(R * b, C), y.reshape(R * b), reduction="none").view(R, b).mean(1)
    return vmap(loss_fn)(out, y)


def check_same_architecture(models: list[nn.Module]) -> None:
    """Every model has the structure of the first (module types, parameter and buffer names and shapes)."""
    def signature(m):
        return ([(n, type(c).__name__) for n, c in m.named_modules()],
                [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()],
                [(n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()])

    ref = signature(models[0])
    for i, m in enumerate(models[1:], 1):
        sig = signature(m)
        for what, a, b in zip(("layers", "parameters", "buffers"), ref, sig):
            if a != b:
                diff = next(((x, y) for x, y in zip(a, b) if x != y), (a[len(b):][:1], b[len(a):][:1]))
                raise ValueError(f"model: run {i}'s architecture differs from run 0's in its {what}: "
                                 f"{diff[1]} against {diff[0]}; all runs must share one architecture")


def sequential_plan(base: nn.Module):
    """The batched-product plan of an ``nn.Sequential`` of supported layers, else None (vmap)."""
    if not isinstance(base, nn.Sequential) or type(base).forward is not nn.Sequential.forward:
        return None
    plan = []
    for name, m in base.named_children():
        if type(m) is nn.Linear:
            plan.append(("linear", name, m))
        elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            plan.append(("flatten", name, m))
        elif type(m) in ELEMENTWISE:
            plan.append(("elementwise", name, m))
        else:
            return None
    return plan


def probe(base: nn.Module, models, loss_fn, loss_name, x, y, all_labels) -> None:
    """Run two examples of every run through the vectorised forward and the loss (eval mode, no update)."""
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.clone() for k, v in buffers.items()}   # a probe must not move running statistics
    stack: list[str] = []
    failed: list[str] = []
    hooks = []
    for name, m in base.named_modules():
        if name:
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: stack.append(name) and None))
            hooks.append(m.register_forward_hook(lambda mod, inp, out: stack.pop() and None))
    base.eval()
    try:
        fn = lambda p, b, xi: functional_call(base, (p, b), (xi,))   # noqa: E731
        with torch.no_grad():
            try:
                out = vmap(fn, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
            except Exception as err:
                layer = stack[-1] if stack else None
                failed.append(layer)
                where = f"layer {layer!r} ({type(base.get_submodule(layer)).__name__})" if layer else "the model"
                raise ValueError(f"model: {where} cannot be vectorised over runs (torch.func.vmap over "
                                 f"functional_call failed: {err}); train such runs with Trainer") from err
    finally:
        for h in hooks:
            h.remove()
        base.train()
    o = out[0]
    if loss_name == "cross_entropy":
        if y.dtype.is_floating_point or o.dim() != 2 or y.dim() != 1:
            raise ValueError(f"labels of shape {tuple(y.shape)} and dtype {y.dtype} do not fit the model's output "
                             f"of shape {tuple(o.shape)} for cross-entropy: expected int64 class indices")
        lo, hi, classes = int(all_labels.min()), int(all_labels.max()), o.shape[-1]
        if lo < 0 or hi >= classes:
            raise ValueError(f"labels range over [{lo}, {hi}] but the model has {classes} outputs")
    try:
        loss_fn(o, y)
    except Exception as err:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not fit the model's output of shape "
                         f"{tuple(o.shape)}: {err}") from err
