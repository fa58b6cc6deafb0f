"""Norm conversion: :func:`convert_norm` swaps the normalisation layers of a model.

Batch, ghost, group, layer norm or none. Written by hand because torch converts no norm other
than with ``SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checks import check_int
from ..models import NORMS, default_groups
from .ghost import GHOST_OF, REMAINDERS, layer_factory
from .layers import is_norm, norm_layers

__all__ = ["CONVERT_TARGETS", "convert_norm"]

# what convert_norm converts to: the norms a model is built with (models.NORMS) and ghost batch norm
CONVERT_TARGETS = (*NORMS, "ghost")


def _channels(layer: nn.Module, name: str) -> int:
    if isinstance(layer, _BatchNorm):
        return layer.num_features
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    shape = tuple(layer.normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"cannot convert {name or 'model'}: LayerNorm over shape {shape} has no single channel "
                         f"axis; only LayerNorm(C) over (N, C) features converts")
    return shape[0]


def _affine(layer: nn.Module) -> bool:
    if isinstance(layer, nn.LayerNorm):
        return layer.elementwise_affine and layer.weight is not None
    return bool(layer.affine)


def _image_input(parent: Optional[nn.Module], child_name: str, layer: nn.Module) -> bool:
    """Whether ``layer`` sees (N, C, H, W) maps: a BatchNorm2d, or a norm right after a Conv2d."""
    if isinstance(layer, nn.BatchNorm2d):
        return True
    if isinstance(layer, _BatchNorm):
        return False
    if parent is None:
        return False
    previous = None
    for name, child in parent.named_children():
        if name == child_name:
            break
        previous = child
    return isinstance(previous, nn.Conv2d)


def _fresh_affine(layer: nn.Module) -> nn.Module:
    """``layer`` with gamma 1 and beta 0 (what a new layer starts with), statistics untouched."""
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.fill_(1.0)
        if getattr(layer, "bias", None) is not None:
            layer.bias.fill_(0.0)
    return layer


def _build(to: str, layer: nn.Module, name: str, image: bool, *, virtual_batch_size: int, groups: Optional[int],
           remainder: str, keep_affine: bool, model_factory: Optional[dict] = None) -> nn.Module:
    if to == "none":
        return nn.Identity()
    channels = _channels(layer, name)
    affine = _affine(layer)
    # A layer without parameters or buffers (affine-less group or layer norm) says nothing of the
    # model's device and dtype: take the model's, or a new BatchNorm's statistics would not match.
    factory = layer_factory(layer) or (model_factory or {})
    eps = layer.eps
    if to in ("batch", "ghost"):
        if isinstance(layer, _BatchNorm):
            base = nn.BatchNorm2d if isinstance(layer, nn.BatchNorm2d) else nn.BatchNorm1d
            if isinstance(layer, nn.BatchNorm3d):
                if to == "ghost":
                    raise ValueError(f"cannot convert {name or 'model'} to 'ghost': BatchNorm3d has no ghost version")
                base = nn.BatchNorm3d
            kwargs = dict(eps=eps, momentum=layer.momentum, affine=layer.affine,
                          track_running_stats=layer.track_running_stats)
        else:
            base = nn.BatchNorm2d if image else nn.BatchNorm1d
            kwargs = dict(eps=eps, affine=affine)
        if to == "ghost":
            new = GHOST_OF[base](channels, virtual_batch_size, remainder=remainder, **kwargs, **factory)
        else:
            new = base(channels, **kwargs, **factory)
        if isinstance(layer, _BatchNorm):
            # Same statistic, same meaning: running estimates and counters carry over too.
            new.load_state_dict(layer.state_dict())
            return new if keep_affine else _fresh_affine(new)
    elif to == "group":
        g = groups
        if g is None:
            g = default_groups(channels)  # the same default as make_norm
        if channels % g:
            raise ValueError(f"groups={g} does not divide the {channels} channels of {name or 'model'}; "
                             f"choose groups dividing {channels}")
        new = nn.GroupNorm(g, channels, eps=eps, affine=affine, **factory)
    else:  # "layer"
        if isinstance(layer, nn.LayerNorm):
            new = copy.deepcopy(layer)
            return new if keep_affine else _fresh_affine(new)
        # GroupNorm(1, C) is layer norm for (N, C) features (identical to LayerNorm(C)) and for
        # (N, C, L) or (N, C, H, W) maps (over all of C and the positions, per-channel affine).
        new = nn.GroupNorm(1, channels, eps=eps, affine=affine, **factory)
    if keep_affine and affine and getattr(new, "weight", None) is not None:
        # gamma and beta are a per-channel scale and shift of a normalised value in every one of
        # these layers, so they carry over; statistics (how values are normalised) do not.
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None and new.bias is not None:
                new.bias.copy_(layer.bias)
    return new


def convert_norm(model: nn.Module, to: str, *, virtual_batch_size: int = 32, groups: Optional[int] = None,
                 remainder: str = "merge", keep_affine: bool = True, inplace: bool = True) -> nn.Module:
    """Swap every normalisation layer of ``model`` for another kind.

    ===========  =======================================================================
    ``to``       each BatchNorm / GhostBatchNorm / GroupNorm / LayerNorm(C) becomes
    ===========  =======================================================================
    ``"batch"``  ``nn.BatchNorm1d`` (``nn.BatchNorm2d`` for 2-d BN or after a ``Conv2d``)
    ``"ghost"``  :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` (``virtual_batch_size``)
    ``"group"``  ``nn.GroupNorm(groups, C)`` (default groups as in ``models.make_norm``)
    ``"layer"``  ``nn.GroupNorm(1, C)``: layer norm over ``(N, C)`` or ``(N, C, ...)`` inputs
    ``"none"``   ``nn.Identity()``
    ===========  =======================================================================

    The per-channel affine parameters (gamma, beta) carry over whenever both layers have them:
    they are a scale and shift of a normalised value in all these layers. Running statistics
    carry over only between batch and ghost batch norm, which estimate the same thing; a new
    BatchNorm from group or layer norm starts with fresh statistics. Everything is checked and
    built before the model is touched. The new layers hold new parameter tensors: convert before
    building an optimizer (or a Trainer) over the model.

    Args:
        model: The model (or a single norm layer).
        to: One of :data:`CONVERT_TARGETS` (``models.NORMS`` and ``"ghost"``).
        virtual_batch_size: Examples per statistic for ``to="ghost"``.
        groups: Groups for ``to="group"``; must divide every converted layer's channels.
        remainder: Ghost BN's rule for a virtual batch that does not divide the batch.
        keep_affine: Copy gamma and beta into the new layers (False: fresh ones, 1 and 0).
        inplace: Replace the layers inside ``model`` (True) or return a converted deep copy,
            leaving ``model`` unchanged (False).

    Returns:
        The converted model: ``model`` itself when ``inplace`` (unless ``model`` is itself a norm
        layer, which is returned converted), else the copy.

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (6,), 2, norm="batch")
        >>> convert_norm(model, "group", groups=3, inplace=False)[2]
        GroupNorm(3, 6, eps=1e-05, affine=True, bias=True)
        >>> convert_norm(model, "ghost", virtual_batch_size=16)[2]
        GhostBatchNorm1d(6, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, virtual_batch_size=16, remainder='merge')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(to, str) or to.lower() not in CONVERT_TARGETS:
        raise ValueError(f"to must be one of {CONVERT_TARGETS}, got {to!r}")
    to = to.lower()
    virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, 2)
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if groups is not None:
        if to != "group":
            raise ValueError(f"groups is only used with to='group', got groups={groups!r} with to={to!r}")
        groups = check_int("groups", groups, 1)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if not isinstance(keep_affine, bool):
        raise TypeError(f"keep_affine must be True or False, got {keep_affine!r}")
    if not norm_layers(model):
        raise ValueError(f"model has no normalisation layers to convert (BatchNorm, GroupNorm or LayerNorm); "
                         f"{type(model).__name__} with nn.Identity norm slots is built with norm='none': "
                         f"build it with the norm you want instead (e.g. models.MLP(norm='batch'))")
    target = model if inplace else copy.deepcopy(model)
    if is_norm(target):
        new = _build(to, target, "", _image_input(None, "", target), virtual_batch_size=virtual_batch_size,
                     groups=groups, remainder=remainder, keep_affine=keep_affine)
        return new.train(target.training)
    # Build every replacement first (any error leaves the model untouched), then swap.
    swaps = []
    # Every slot, a layer registered in several places included (remove_duplicate=False): each
    # slot gets the one replacement of its layer, so shared layers stay shared.
    modules = dict(target.named_modules(remove_duplicate=False))
    built: dict[int, nn.Module] = {}
    model_factory = layer_factory(target)
    for name, layer in modules.items():
        if not is_norm(layer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if any(name.startswith(done + ".") for done, *_ in swaps):
            continue  # inside a norm layer that is being replaced
        if id(layer) not in built:
            new = _build(to, layer, name, _image_input(parent, child, layer), virtual_batch_size=virtual_batch_size,
                         groups=groups, remainder=remainder, keep_affine=keep_affine, model_factory=model_factory)
            built[id(layer)] = new.train(layer.training)
        swaps.append((name, parent, child, built[id(layer)]))
    for _, parent, child, new in swaps:
        setattr(parent, child, new)
    return target
