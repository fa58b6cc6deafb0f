"""Precise BN: :func:`precise_bn` recomputes the running statistics over training batches.

It does what ``torch.optim.swa_utils.update_bn`` does (reset, then a cumulative average with
``momentum=None``), but under ``no_grad``, for a bounded number of batches, and restoring the
layers' momentum and the model's mode even when a batch fails.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
from torch import nn

from ..checks import check_int
from .layers import model_device, restore_layers, running_layers, snapshot_layers
from .stats import check_inputs

__all__ = ["precise_bn"]


def _batches_from(data: Any, batch_size: Optional[int], num_batches: int, seed: int):
    """An iterator over at most ``num_batches`` input batches (checked before anything runs)."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):   # an nbbatch DataBundle
        data = data.x_train
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = data[0]
    if isinstance(data, torch.Tensor):
        x = check_inputs(data, "data")
        if batch_size is None:
            raise ValueError("batch_size is needed when data is a tensor (or a pair of tensors): the size of "
                             "the training batches whose statistics to average, e.g. batch_size=64")
        batch_size = check_int("batch_size", batch_size, 2)
        if batch_size > len(x):
            raise ValueError(f"batch_size={batch_size} is larger than data ({len(x)} examples)")

        def gen():
            g = torch.Generator().manual_seed(int(seed))
            given = 0
            while True:   # passes over the data in a seeded order, short tails dropped
                perm = torch.randperm(len(x), generator=g).to(x.device)
                for i in range(0, len(x) - batch_size + 1, batch_size):
                    yield x[perm[i:i + batch_size]]
                    given += 1
                    if given == num_batches:
                        return
        return gen()
    if batch_size is not None:
        raise ValueError("batch_size is only used when data is a tensor; an iterable gives its own batches")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be input tensors, a pair (x, y), a DataBundle or an iterable of batches "
                        f"(a DataLoader), got {type(data).__name__}")
    return itertools.islice(iter(data), num_batches)


def precise_bn(model: nn.Module, data: Any, *, num_batches: int = 100, batch_size: Optional[int] = None,
               seed: int = 0) -> nn.Module:
    """Recompute the running statistics of every BN layer over training batches ("precise BN").

    The running estimates an exponential moving average leaves behind mix statistics of older
    weights; after training (or after changing weights: averaging, pruning, loading) they can be
    stale. This resets them and feeds ``num_batches`` batches through the model in train mode
    under ``no_grad`` with ``momentum=None``, so each layer's running mean becomes the plain
    average of the batch means and its running variance the average of the (unbiased) batch
    variances, as ``torch.optim.swa_utils.update_bn`` does. The layers' momentum, every module's
    mode, and (on any error) the old statistics are restored. Weights are not touched.

    Args:
        model: A model with batch-norm layers.
        data: Training inputs: a tensor ``(N, ...)``, a tuple ``(x, y)``, a ``DataBundle`` (its
            training split), or an iterable of batches (a DataLoader; tuples use their first item).
        num_batches: How many batches to average over.
        batch_size: Size of the batches drawn from tensor data (needed there; use the training
            batch size, or the virtual batch size of ghost BN).
        seed: Seeds the order in which tensor data is drawn.

    Returns:
        ``model``.

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (4,), 2, norm="batch")
        >>> x = torch.randn(256, 8)
        >>> _ = precise_bn(model, x, batch_size=256, num_batches=1)    # one batch: its exact statistics
        >>> h = model[1](x).detach()
        >>> torch.allclose(model[2].running_mean, h.mean(0)), torch.allclose(model[2].running_var, h.var(0))
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, layer) for name, layer in running_layers(model) if layer.track_running_stats]
    if not layers:
        raise ValueError("model's batch-norm layers keep no running statistics (track_running_stats=False)")
    num_batches = check_int("num_batches", num_batches, 1)
    batches = _batches_from(data, batch_size, num_batches, seed)
    device = model_device(model)
    saved = snapshot_layers(layers)
    momenta = [layer.momentum for _, layer in layers]
    modes = {m: m.training for m in model.modules()}
    used = 0
    try:
        with torch.no_grad():
            for _, layer in layers:
                layer.reset_running_stats()
                layer.momentum = None        # cumulative average over the batches seen
            model.train()
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                model(batch.to(device) if device is not None else batch)
                used += 1
        if used == 0:
            raise ValueError("data gave no batches to recompute the statistics from")
    except BaseException:
        restore_layers(layers, saved)
        raise
    finally:
        for (_, layer), momentum in zip(layers, momenta):
            layer.momentum = momentum
        for m, flag in modes.items():
            m.training = flag
    return model
