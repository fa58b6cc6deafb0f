"""Trial training steps: what :func:`~nbbatch.memory.measure` and the finder run and read.

A trial builds a Trainer on a model at one batch size (the data repeated to fill it), runs
real steps and reports the step's memory (CPU: exact accounting; CUDA: the allocator's peak)
and its time. The helpers here turn the user's data into a sample, set a constant-lr
configuration, recognise an out-of-memory error and release what it holds, and snapshot and
restore what a trial changes.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..batching import as_tensors, train_tensors
from ..config import TrainConfig
from ..trainer import Trainer
from .accounting import account_step, state_bytes

__all__ = ["TrainingState", "is_oom", "make_config", "release_after_oom", "run_trial", "sample_of", "sync", "tile"]

SAMPLE = 256   # examples taken from a Dataset that is not in memory as tensors


def sample_of(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) tensors from a DataBundle, tensors, a TensorDataset, a Dataset, a DataLoader or a Trainer.

    Memory and speed do not depend on the values, so a Dataset or DataLoader gives one sample
    (its first batch, or its first 256 examples) that is repeated to any batch size.

    Example:
        >>> x, y = sample_of((torch.zeros(3, 2), torch.zeros(3)))
        >>> tuple(x.shape), tuple(y.shape)
        ((3, 2), (3,))
    """
    if isinstance(data, Trainer):
        held = data.training_tensors()
        data = held if held is not None else data.training_data
    if isinstance(data, DataLoader):
        # a shuffling loader's sampler draws from the global RNG: the caller's stays as it was
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(data))
        return batch[0], batch[1]
    if hasattr(data, "x_train") or as_tensors(data) is not None:
        return train_tensors(data)
    if isinstance(data, Dataset) and hasattr(data, "__len__") and len(data) > 0:
        items = [data[i] for i in range(min(len(data), SAMPLE))]
        return (torch.stack([torch.as_tensor(it[0]) for it in items]),
                torch.stack([torch.as_tensor(it[1]) for it in items]))
    raise TypeError(f"data must be a DataBundle, a pair (x, y) of tensors, a Dataset or a DataLoader, "
                    f"got {type(data).__name__}")


def tile(x: torch.Tensor, y: torch.Tensor, n: int):
    """``n`` examples, repeating the data when it has fewer (memory does not depend on values)."""
    if len(x) == 0:
        raise ValueError("data is empty")
    idx = torch.arange(n, device=x.device) % len(x)
    return x[idx], y[idx]


def make_config(config: TrainConfig | None, options: Mapping, batch_size: int) -> TrainConfig:
    """``config`` (or the defaults) with ``options``, at ``batch_size``, with a constant lr."""
    cfg = TrainConfig(**options) if config is None else config.replace(**options)
    # Memory and speed do not depend on the lr schedule: a constant one needs no run length.
    return cfg.replace(batch_size=batch_size, warmup="none", warmup_steps=None, warmup_epochs=None,
                       decay="constant", decay_steps=None, decay_epochs=None, total_steps=None,
                       total_epochs=None, eval_every=None)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock or a memory reading sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    """True when ``err`` says the device (or the host) ran out of memory."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(err, (oom, MemoryError)):
        return True
    # CUDA/MPS say "out of memory"; the CPU allocator raises a plain RuntimeError of its own words
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def release_after_oom(err: BaseException, device: torch.device) -> None:
    """Free what a failed step's error still holds, so memory returns to its baseline."""
    # The traceback's frames hold the step's tensors: clear them; on CUDA also collect what
    # reference cycles still hold and give the cached blocks back.
    traceback.clear_frames(err.__traceback__)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


class TrainingState:
    """A CPU copy of what a trial step changes: model, grads, optimizer, training flag, RNG.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> saved = TrainingState(model, None)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> changed = model.weight.clone()
        >>> saved.restore()
        >>> bool(torch.equal(model.weight, changed - 1.0))
        True
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.grads = [None if p.grad is None else p.grad.detach().to("cpu", copy=True) for p in model.parameters()]
        self.opt = _to_cpu(optimizer.state_dict()) if optimizer is not None else None
        self.training = model.training
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.weights[k])
            for p, g in zip(self.model.parameters(), self.grads):
                p.grad = None if g is None else g.to(p.device, copy=True)
        if self.optimizer is not None:
            # load_state_dict keeps the given tensors when no cast is needed: hand it a copy, so
            # the next trial's in-place updates cannot reach the snapshot
            self.optimizer.load_state_dict(_to_cpu(self.opt))
        self.model.train(self.training)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def run_trial(model, x, y, cfg, *, optimizer=None, steps: int = 2, timed: int = 0, account: bool | None = None) -> dict:
    """Real Trainer steps at ``cfg.batch_size`` on ``model`` (changed: the caller restores it).

    Returns a row: memory parts (CPU) or the allocator's peak (CUDA), time per step, examples/s.
    """
    B = cfg.batch_size
    xb, yb = tile(x, y, B)
    trainer = Trainer(model, (xb, yb), cfg)
    device = trainer.device
    if optimizer is not None:
        trainer.optimizer = optimizer   # the user's optimizer, so its existing state is counted
    account = device.type != "cuda" if account is None else account
    row: dict[str, Any] = {"batch_size": B}
    # Steps before the measured one create the optimizer state (it exists from the second step on).
    for _ in range(max(steps - 1, 0)):
        trainer.step()
    if account:
        row.update(account_step(trainer).as_dict())
        row["method"] = "accounting"
    else:
        # The allocator's peak during one step, less what was allocated before it that is not
        # training state (the data, the caller's other tensors), so the total is comparable with
        # the accounting: parameters + gradients + optimizer state + everything the step allocates.
        state = state_bytes(trainer.model, trainer.optimizer)
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step()
        sync(device)
        row["total"] = int(torch.cuda.max_memory_allocated(device) - before + state)
        row["method"] = "allocator"
    times = []
    for _ in range(timed):
        sync(device)
        t0 = time.perf_counter()
        trainer.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if times:
        t = statistics.median(times)
        row["time_per_step"] = t
        row["examples_per_s"] = B / t if t > 0 else float("inf")
    return row
