"""Exact accounting of a training step's memory (the CPU's measurement), by part.

Parameters and buffers + gradients + optimizer state + the tensors autograd saves for backward,
counted with ``torch.autograd.graph.saved_tensors_hooks`` (``nbbatch.recompute.SavedCounter``)
with each storage counted once, at the moment the most of them are alive.

Written by hand: no maintained library counts the bytes a CPU training step keeps alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from ..recompute import SavedCounter, storage_key

__all__ = ["MemoryParts", "account_step", "optimizer_tensors", "state_bytes", "unique_bytes"]


def unique_bytes(tensors: Iterable) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one).

    Example:
        >>> x = torch.zeros(10)
        >>> unique_bytes([x, x[:5], torch.zeros(2)])   # x and its view share 40 bytes
        48
    """
    seen: dict = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key, n = storage_key(t)
            seen[key] = n
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    """The tensors of an optimizer's state (momentum buffers, Adam's moments, ...)."""
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the training state: parameters and buffers, gradients, optimizer state.

    Example:
        >>> model = torch.nn.Linear(3, 2)   # 8 float32 numbers, no gradients yet
        >>> state_bytes(model, None)
        32
    """
    params = list(model.parameters())
    return (unique_bytes(params + list(model.buffers()))
            + unique_bytes(p.grad for p in params if p.grad is not None)
            + (unique_bytes(optimizer_tensors(optimizer)) if optimizer is not None else 0))


@dataclass(frozen=True)
class MemoryParts:
    """Bytes of one accounted training step, by part.

    ``params`` (parameters and buffers), ``grads``, ``optimizer`` (its state), ``saved`` (the
    largest total of tensors saved for backward alive at once in the forward, parameters and
    buffers excluded). Under activation checkpointing also ``kept`` (the chunk inputs, part of
    ``saved``) and ``recompute`` (the activations of the largest chunk, recomputed in backward).
    ``fixed`` is the part that does not depend on the batch size; ``total`` is
    ``fixed + max(saved, kept + recompute)``: the end of the forward, or the recomputation in
    backward with every chunk input still kept (an upper bound: later chunks are freed by then).
    """

    params: int
    grads: int
    optimizer: int
    saved: int
    recompute: int = 0
    kept: int = 0

    @property
    def fixed(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def activations(self) -> int:
        return max(self.saved, self.kept + self.recompute)

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def as_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "saved": self.saved, "recompute": self.recompute, "kept": self.kept,
                "activations": self.activations, "total": self.total}


def account_step(trainer) -> MemoryParts:
    """Run one real training step of ``trainer`` and count the bytes it keeps alive, by part.

    This is the CPU's memory measurement (exact accounting; no allocator statistics exist
    there). It does train: the step updates the model like ``trainer.step()``.
    Transient buffers that autograd does not save (the gradient flowing backward, kernel
    workspace) are not counted.

    Args:
        trainer: a :class:`~nbbatch.trainer.Trainer` (anything with ``model``, ``optimizer``
            and ``step()``).

    Returns:
        :class:`MemoryParts`.

    Example:
        >>> import torch
        >>> from nbbatch import Trainer
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        >>> t = Trainer(MLP(40, (100,), 10), (x, y), batch_size=64, optimizer="adam")
        >>> parts = account_step(t)
        >>> parts.params == parts.grads == 4 * (40 * 100 + 100 + 100 * 10 + 10)
        True
        >>> parts.saved == 64 * 4 * (40 + 100 + 10) + 64 * 8 + 4  # input, ReLU out, log-probs, labels
        True
    """
    model, optimizer = trainer.model, trainer.optimizer
    params = list(model.parameters())
    # parameters and buffers are counted in ``params``; autograd saves some of them (weights,
    # and batch norm's running statistics in eval mode): not a second time in ``saved``
    exclude = {storage_key(t)[0] for t in params + list(model.buffers())}
    counter = SavedCounter(exclude)
    with counter:
        trainer.step()
    return MemoryParts(
        params=unique_bytes(list(params) + list(model.buffers())),
        grads=unique_bytes(p.grad for p in params if p.grad is not None),
        optimizer=unique_bytes(optimizer_tensors(optimizer)),
        saved=counter.peak,
        recompute=counter.recompute,
        kept=counter.kept,
    )
