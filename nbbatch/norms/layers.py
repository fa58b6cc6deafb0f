"""Finding a model's normalisation layers, and saving and restoring their batch-norm state."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "bn_layers",
    "is_norm",
    "model_device",
    "norm_layers",
    "restore_layers",
    "running_layers",
    "snapshot_layers",
]


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(name, layer)`` for every batch-norm layer of ``model`` (ghost BN included), in order.

    Example:
        >>> from nbbatch.models import MLP
        >>> [name for name, _ in bn_layers(MLP(8, (4, 4), 2, norm="batch"))]
        ['2', '5']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every normalisation layer (batch, ghost, group, layer norm) of ``model``.

    A layer inside another norm layer is not listed twice. ``nn.Identity`` slots (``norm="none"``)
    are not norm layers.

    Example:
        >>> from nbbatch.models import CNN1d
        >>> [type(m).__name__ for _, m in norm_layers(CNN1d(norm="group"))]
        ['GroupNorm', 'GroupNorm', 'GroupNorm']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if is_norm(m)]


def running_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model has no batch-norm layers (nn.BatchNorm1d/2d/3d or GhostBatchNorm)")
    return layers


def snapshot_layers(layers) -> list[dict]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for _, layer in layers]


def restore_layers(layers, saved) -> None:
    with torch.no_grad():
        for (_, layer), state in zip(layers, saved):
            for key, value in state.items():
                getattr(layer, key).copy_(value)


def model_device(model: nn.Module) -> Optional[torch.device]:
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    return ref.device if ref is not None else None
