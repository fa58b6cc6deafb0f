"""The warning for gradient accumulation over a model with batch norm.

:func:`warn_accumulation_with_bn` is what the Trainer calls when it accumulates over a model with
batch norm: each micro-batch is normalised on its own, so accumulation is then *not* one larger
batch.
"""

from __future__ import annotations

import warnings

from torch import nn

from .ghost import GhostMixin
from .layers import bn_layers

__all__ = ["BatchNormAccumulationWarning", "warn_accumulation_with_bn"]


class BatchNormAccumulationWarning(UserWarning):
    """Gradient accumulation over a model with batch norm is not one larger batch."""


def _micro_sizes(batch_size: int, accumulate: int) -> list[int]:
    # The sizes torch.tensor_split(batch, accumulate) gives, as the Trainer splits a batch.
    k = min(accumulate, batch_size)
    q, r = divmod(batch_size, k)
    return [q + 1] * r + [q] * (k - r)


def warn_accumulation_with_bn(model: nn.Module, batch_size: int, accumulate: int, *, stacklevel: int = 2,
                              cause: str | None = None) -> bool:
    """Warn (:class:`BatchNormAccumulationWarning`) when accumulating over a model with batch norm.

    With ``accumulate = k`` each micro-batch is normalised with its own statistics and moves the
    running estimates once, so the summed gradient is *not* that of one batch of ``batch_size``:
    it is ghost batch norm with virtual batches of the micro-batch size. No warning when there is
    no accumulation or no BN, nor when every BN layer is a ghost layer whose virtual batch
    divides every micro-batch: then accumulation gives exactly the one-batch update.

    Args:
        model: The model being trained.
        batch_size: Examples per optimizer step.
        accumulate: Micro-batches per optimizer step.
        stacklevel: Passed to ``warnings.warn``.
        cause: what splits the batch, when it is not ``accumulate=...`` itself (the message starts with it).

    Returns:
        Whether it warned.

    Example:
        >>> from nbbatch.models import MLP
        >>> from nbbatch.norms import convert_norm
        >>> warn_accumulation_with_bn(MLP(norm="batch"), 64, 1), warn_accumulation_with_bn(MLP(), 64, 4)
        (False, False)
        >>> model = convert_norm(MLP(norm="batch"), "ghost", virtual_batch_size=16)
        >>> warn_accumulation_with_bn(model, 64, 4)     # micro-batches of 16 = the virtual batch: exact
        False
    """
    if accumulate <= 1:
        return False
    layers = bn_layers(model)
    if not layers:
        return False
    sizes = _micro_sizes(batch_size, accumulate)
    if all(isinstance(layer, GhostMixin) and all(m % layer.virtual_batch_size == 0 for m in sizes)
           for _, layer in layers):
        return False
    shown = sorted(set(sizes))
    micro = str(shown[0]) if len(shown) == 1 else " or ".join(map(str, shown))
    warnings.warn(
        f"{cause or f'accumulate={accumulate}'} over a model with batch norm ({len(layers)} BN layer(s)): each micro-batch of "
        f"{micro} examples is normalised with its own statistics and moves the running estimates "
        f"{len(sizes)} times per step, so this is not one batch of {batch_size} but ghost batch norm with "
        f"virtual batches of {micro}. Choices: keep those semantics on purpose with "
        f"nbbatch.norms.convert_norm(model, 'ghost', virtual_batch_size=v), v dividing {micro} (accumulation is "
        f"then exact, and this warning goes); normalise without the batch with convert_norm(model, 'group') "
        f"or 'layer'; or use accumulate=1.",
        BatchNormAccumulationWarning, stacklevel=stacklevel + 1)
    return True
