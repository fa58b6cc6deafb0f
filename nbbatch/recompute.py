"""Activation recomputation (Chen et al. 2016) and the count of the tensors autograd saves.

- :func:`checkpointed` wraps an ``nn.Sequential`` so that all but its last chunk run under
  ``torch.utils.checkpoint`` (the Trainer's ``checkpoint_segments`` option);
  :class:`Checkpointed` marks single blocks of any model. Batch-norm running statistics move
  once per step, as without recomputation.
- :class:`SavedCounter` counts the bytes of the tensors autograd saves for backward while they
  are alive (``torch.autograd.graph.saved_tensors_hooks``), each storage once; the recomputed
  chunks report what they keep and what their recomputation adds to the counter active in this
  thread. ``nbbatch.memory.account_step`` builds the CPU's memory measurement on it.

This module sits below the Trainer and imports nothing of nbbatch; ``nbbatch.memory``
re-exports ``checkpointed``, ``Checkpointed`` and ``CheckpointedSequential``.

The recomputation is ``torch.utils.checkpoint``; written by hand are the chunking (as
``checkpoint_sequential``, with batch-norm statistics kept to one update) and the saved-tensor
count (no maintained library counts the bytes a CPU training step keeps alive).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .checks import is_int
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Checkpointed", "CheckpointedSequential", "SavedCounter", "check_checkpointed", "checkpointed",
           "storage_key"]

_ACTIVE = threading.local()   # the counter of the accounted step running in this thread, if any


# ====================================================================== saved-tensor counting
def storage_key(t: torch.Tensor) -> tuple[tuple, int]:
    """(device type, device index, data pointer) of ``t``'s storage, and its size in bytes."""
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


class _Held:
    """What the pack hook stores in the graph: the tensor, released (and uncounted) with the graph."""

    __slots__ = ("tensor", "key", "counter", "__weakref__")

    def __init__(self, counter: "SavedCounter", tensor: torch.Tensor, key):
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self):
        self.counter._release(self.key)


class SavedCounter:
    """Count the bytes of tensors autograd saves for backward while they are alive.

    Each storage is counted once however many saved tensors view it; storages in ``exclude``
    (the parameters and buffers: counted in their own part) are not counted. ``peak`` is the largest
    total alive at any moment of the step (micro-batches of an accumulated step free their
    graph before the next one starts, so they do not add up).
    """

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.refs: dict = {}
        self.sizes: dict = {}
        self.live = 0
        self.peak = 0
        self.recompute = 0   # largest one-chunk recomputation of activation checkpointing
        self.kept = 0        # chunk inputs kept by activation checkpointing
        self.kept_keys: set = set()

    def pack(self, t: torch.Tensor):
        key, n = storage_key(t)
        if key in self.exclude:
            return t
        return self.hold(t, key, n)

    @staticmethod
    def unpack(obj):
        return obj.tensor if isinstance(obj, _Held) else obj

    def hold(self, t: torch.Tensor, key=None, n=None) -> _Held:
        if key is None:
            key, n = storage_key(t)
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = n
            self.live += n
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(self, t, key)

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __enter__(self):
        self._previous = getattr(_ACTIVE, "counter", None)
        _ACTIVE.counter = self
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _ACTIVE.counter = self._previous
        return False


# ====================================================================== activation checkpointing
class CheckpointedSequential(nn.Module):
    """Run an ``nn.Sequential`` in ``segments`` chunks, all but the last under ``torch.utils.checkpoint``.

    The activations inside a checkpointed chunk are not kept for backward; they are recomputed
    (one extra forward of the chunk) when backward reaches it (Chen et al. 2016). Only the chunk
    inputs stay alive. Gradients are those of the plain model (dropout masks are replayed with
    the saved RNG state). Batch-norm running statistics are updated once, as without
    checkpointing (the recomputation's second update is undone). Used only while gradients are
    enabled; evaluation runs the plain model.

    Args:
        model: the ``nn.Sequential`` (its layers are shared, not copied).
        segments: number of chunks, ``2 <= segments <= len(model)``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> wrapped = CheckpointedSequential(net, 2)
        >>> [len(c) for c in wrapped.chunks]
        [1, 2]
        >>> bool(torch.equal(wrapped(torch.ones(3, 4)), net(torch.ones(3, 4))))
        True
    """

    def __init__(self, model: nn.Sequential, segments: int):
        super().__init__()
        _check_checkpointable(model, segments)
        layers = list(model.children())
        size = len(layers) // segments
        # as torch.utils.checkpoint.checkpoint_sequential: equal chunks, the remainder in the last
        bounds = [(i * size, (i + 1) * size) for i in range(segments - 1)] + [((segments - 1) * size, len(layers))]
        self.model = model
        self.chunks = [nn.Sequential(*layers[a:b]) for a, b in bounds]

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.model(x)
        counter = getattr(_ACTIVE, "counter", None)
        for chunk in self.chunks[:-1]:
            out = checkpoint(_run_once_updating(chunk), x, use_reentrant=False, preserve_rng_state=True)
            if counter is not None:
                self._account(counter, chunk, x, out)
            x = out
        return self.chunks[-1](x)

    @staticmethod
    def _account(counter: SavedCounter, chunk: nn.Module, x, out) -> None:
        # The chunk's input is kept (in checkpoint's closure) until backward is through it:
        # tie a counted hold to the output's graph node, which lives exactly as long.
        exclude = set(counter.exclude)
        if isinstance(x, torch.Tensor):
            key, n = storage_key(x)
            exclude.add(key)
            if out.grad_fn is not None and key not in counter.exclude:
                if key not in counter.kept_keys:
                    counter.kept_keys.add(key)
                    counter.kept += n
                out.grad_fn.metadata.setdefault("nbbatch_held", []).append(counter.hold(x, key, n))
        # What backward's recomputation of this chunk adds to its kept input: one plain
        # forward, counted apart (RNG state kept, so the real step sees the same dropout masks).
        sub = SavedCounter(exclude)
        devices = [x.device] if isinstance(x, torch.Tensor) and x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _keep_norm_stats(_norms(chunk)), sub:
            inp = x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
            _ = chunk(inp)
            del _
        counter.recompute = max(counter.recompute, sub.peak)


class Checkpointed(nn.Module):
    """Mark one block for activation checkpointing: ``Checkpointed(block)`` computes ``block(x)``
    under ``torch.utils.checkpoint`` while gradients are enabled (only its input is kept; its
    inside is recomputed in backward), and plainly otherwise. Use it for the blocks of a model
    that is not an ``nn.Sequential``; it is counted by :func:`account_step` like a chunk.

    Args:
        block: the module to checkpoint (shared, not copied).

    Example:
        >>> import torch
        >>> block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> net = torch.nn.Sequential(Checkpointed(block), torch.nn.Linear(4, 2))
        >>> net(torch.ones(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        self.block = block

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.block(x)
        out = checkpoint(_run_once_updating(self.block), x, use_reentrant=False, preserve_rng_state=True)
        counter = getattr(_ACTIVE, "counter", None)
        if counter is not None:
            CheckpointedSequential._account(counter, self.block, x, out)
        return out


def _norms(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


@contextlib.contextmanager
def _keep_norm_stats(norms: list):
    """Run a block without moving batch-norm running statistics (restored afterwards)."""
    kept = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, kept):
                for b, v in zip(m.buffers(), bufs):
                    b.copy_(v)


def _run_once_updating(module: nn.Module):
    """``module`` as a function for ``checkpoint``, whose second call (backward's recomputation)
    leaves batch-norm running statistics as the first call left them.

    The recomputation sees the same input in the same mode, so its outputs are those of the first
    call; only the running buffers would move a second time (momentum applied twice).
    """
    norms = _norms(module)
    if not norms:
        return module
    calls = [0]

    def run(x):
        calls[0] += 1
        if calls[0] == 1:
            return module(x)
        with _keep_norm_stats(norms):
            return module(x)
    return run


def _check_checkpointable(model: nn.Module, segments) -> None:
    """Raise a clear error unless ``model`` can be checkpointed in ``segments`` chunks."""
    if not is_int(segments) or segments < 2:
        raise ValueError(f"checkpoint_segments must be an int >= 2 (or 0 for no checkpointing), got {segments!r}")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"checkpoint_segments needs an nn.Sequential model (its layers are split into chunks), "
                        f"got {type(model).__name__}; wrap the blocks to checkpoint in an nn.Sequential")
    if segments > len(model):
        raise ValueError(f"checkpoint_segments={segments} is more than the model's {len(model)} layers")


def check_checkpointed(model: nn.Module, segments: int) -> None:
    """Raise the error ``checkpointed(model, segments)`` would raise, building nothing.

    Example:
        >>> check_checkpointed(torch.nn.Linear(4, 2), 0)      # no checkpointing: any model
        >>> check_checkpointed(torch.nn.Linear(4, 2), 2)
        Traceback (most recent call last):
        ...
        TypeError: checkpoint_segments needs an nn.Sequential model (its layers are split into chunks), got Linear; wrap the blocks to checkpoint in an nn.Sequential
    """
    if segments not in (0, 1):
        _check_checkpointable(model, segments)


def checkpointed(model: nn.Module, segments: int) -> nn.Module:
    """The module the Trainer calls for the forward pass: ``model`` itself, or checkpointed.

    Args:
        model: the model (an ``nn.Sequential`` when ``segments >= 2``).
        segments: 0 (or 1) for no checkpointing, else the number of chunks.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> checkpointed(net, 0) is net, type(checkpointed(net, 3)).__name__
        (True, 'CheckpointedSequential')
    """
    if segments in (0, 1):
        return model
    return CheckpointedSequential(model, segments)
