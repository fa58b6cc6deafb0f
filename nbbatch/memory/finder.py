"""The largest batch size whose real training step fits a memory budget: :func:`find_max_batch_size`.

The search grows the batch by doubling and then bisects (or starts from a line through two small
trials), every trial a real training step, and restores model, optimizer and RNG state after each.
Written by hand: the peers' versions of this search are tied to their trainers.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..checks import check_positive_int, is_int
from ..config import TrainConfig
from ..device import describe_device, resolve_device, resolve_precision
from ..trainer import Trainer
from . import trials   # called through the module: a test can stand in for a trial in one place
from .accounting import state_bytes, unique_bytes
from .model import MemoryModel, check_budget, check_round_to, mib, round_down

__all__ = ["FinderResult", "find_max_batch_size"]


@dataclass
class FinderResult:
    """The answer of :func:`find_max_batch_size` and the trials that led to it."""

    batch_size: int
    largest_fitting: int
    trials: list[dict]
    budget: int
    seconds: float
    device: str

    def __repr__(self) -> str:
        return (f"FinderResult(batch_size={self.batch_size}, largest_fitting={self.largest_fitting}, "
                f"trials={len(self.trials)}, budget={mib(self.budget):.2f} MiB)")


def find_max_batch_size(target, data=None, *, budget=None, margin: float = 0.05, start: int = 1,
                        limit: int = 2**20, round_to=None, steps: int = 2, strategy: str = "bisect",
                        config=None, **options) -> FinderResult:
    """The largest batch size whose real training step fits: grow by doubling, then bisect.

    A batch size fits when its step (forward, backward and the optimizer, at the second step so
    that the optimizer state exists) uses at most ``(1 - margin) * budget`` bytes: on CUDA the
    allocator's peak during the step less what was allocated before it that is not training state
    (with no out-of-memory error), on the CPU the exact accounting of :func:`account_step`. An out-of-memory error is caught, its frames
    cleared and the cache emptied. Model weights, gradients, optimizer state, training mode and
    RNG are restored after every trial, so the search leaves no trace.

    Args:
        target: a ``Trainer`` (its model, optimizer, configuration and data) or an ``nn.Module``.
        data: with a model: a DataBundle, ``(x, y)`` tensors or a TensorDataset (repeated as needed).
        budget: bytes available; required on the CPU; on CUDA defaults to the free device memory
            plus the allocator's cached blocks and the training state already on the device.
        margin: safety fraction of the budget left unused (0 <= margin < 1).
        start: first batch size tried.
        limit: largest batch size considered.
        round_to: None, ``8`` (a multiple of 8) or ``"pow2"`` (a power of two) for the answer.
        steps: training steps per trial (>= 1; the last is measured).
        strategy: ``"bisect"`` (grow by doubling, then bisect) or ``"model"`` (fit a line through
            two small trials, try its prediction and the next batch, gallop from there if it was
            off, then bisect): the same answer from fewer large trials when memory is near linear.
        config, **options: the training configuration (with a model).

    Example:
        >>> import torch
        >>> from nbbatch.models import MLP
        >>> x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        >>> r = find_max_batch_size(MLP(40, (100,), 10), (x, y), budget=2**20, margin=0, device="cpu")
        >>> r.batch_size
        1657
    """

    # A trainer's model is trained and restored trial by trial: no fit may run on it meanwhile.
    hold = target.exclusive("find_max_batch_size") if isinstance(target, Trainer) else contextlib.nullcontext()
    with hold:
        return _find_max_batch_size(target, data, budget=budget, margin=margin, start=start, limit=limit,
                                    round_to=round_to, steps=steps, strategy=strategy, config=config, **options)


def _find_max_batch_size(target, data, *, budget, margin, start, limit, round_to, steps, strategy, config,
                         **options) -> FinderResult:
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
        raise ValueError(f"margin must lie in [0, 1), got {margin!r}")
    check_positive_int("start", start)
    if not is_int(limit) or limit < start:
        raise ValueError(f"limit must be an int >= start={start}, got {limit!r}")
    check_positive_int("steps", steps)
    check_round_to(round_to)
    if strategy not in ("bisect", "model"):
        raise ValueError(f"strategy must be 'bisect' or 'model', got {strategy!r}")
    if budget is not None:
        budget = check_budget(budget)   # before the model moves to the device
    if isinstance(target, Trainer):
        if data is not None or config is not None or options:
            raise ValueError("with a Trainer, give no data, config or options: the trainer's own are used")
        model, optimizer, base = target.model, target.optimizer, target.config
        x, y = trials.sample_of(target)
        device = target.device
    elif isinstance(target, nn.Module):
        if data is None:
            raise ValueError("data: give the data (a DataBundle or (x, y) tensors) with a model")
        model, optimizer = target, None
        x, y = trials.sample_of(data)
        base = TrainConfig(**options) if config is None else config.replace(**options)
        device = resolve_device(base.device)
        resolve_precision(base.precision, device)
        model.to(device)
    else:
        raise TypeError(f"target must be a Trainer or an nn.Module, got {type(target).__name__}")
    if budget is None:
        if device.type != "cuda":
            raise ValueError("budget: on the CPU the finder needs a byte budget, e.g. budget=2**30 (1 GiB)")
        # what training can use: free device memory, the allocator's cached blocks, and the
        # training state already there (counted in every trial's total)
        budget = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                  - torch.cuda.memory_allocated(device) + state_bytes(model, optimizer))
    budget = check_budget(budget)
    # Ghost batch norm normalises only batches its virtual batches fit (at least virtual_batch_size
    # examples, a multiple of it with remainder='error'): the search runs over those sizes only.
    floor = _ghost_floor(model, base.accumulate, start)
    if floor(limit) is None:
        raise ValueError(f"no batch size in [start={start}, limit={limit}] suits the model's ghost batch norm "
                         f"(virtual_batch_size={_virtual_sizes_of(model)}); raise limit")
    start = _ghost_ceiling(model, base.accumulate, start, limit)
    trials.make_config(base, {"accumulate": min(base.accumulate, start)}, start)   # a bad configuration fails here
    allowed = (1 - margin) * budget
    state = trials.TrainingState(model, optimizer)
    tried: list[dict] = []
    t0 = time.perf_counter()

    decided: dict[int, bool] = {}

    def fits(b: int) -> bool:
        b = floor(b)   # the largest size ghost batch norm accepts, at most b (b itself without ghost BN)
        if b in decided:
            return decided[b]
        cfg = trials.make_config(base, {"accumulate": min(base.accumulate, b)}, b)
        try:
            row = trials.run_trial(model, x, y, cfg, optimizer=optimizer, steps=steps)
            row["fits"] = row["total"] <= allowed
        except BaseException as err:   # noqa: B902 - only out-of-memory is handled, the rest re-raised
            if not trials.is_oom(err):
                raise
            trials.release_after_oom(err, device)
            row = {"batch_size": b, "oom": True, "fits": False}
        finally:
            state.restore()
        tried.append(row)
        decided[b] = row["fits"]
        return row["fits"]

    try:
        if not fits(start):
            first = tried[0]
            fixed = first.get("params", 0) + first.get("grads", 0) + first.get("optimizer", 0)
            if not fixed:   # CUDA rows carry no parts: parameters and gradients at least
                fixed = 2 * unique_bytes(list(model.parameters()))
            if fixed > allowed:
                raise ValueError(f"budget={budget} bytes is below the fixed cost of {fixed} bytes: the model alone "
                                 f"(parameters, gradients, optimizer state) does not fit")
            raise ValueError(f"budget={budget} bytes: not even batch size start={start} fits "
                             f"(it needs {first.get('total', 'more than the device has')} bytes)")
        if strategy == "model":
            lo, hi = _guided_bracket(fits, tried, start, limit, allowed)
        else:
            lo, hi = _doubling_bracket(fits, start, limit)
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
    finally:
        state.restore()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    lo = floor(lo)
    answer = round_down(lo, round_to)
    if answer < 1:
        raise ValueError(f"round_to={round_to!r}: the largest fitting batch {lo} rounds down to 0")
    if floor(answer) != answer:
        raise ValueError(f"round_to={round_to!r}: the largest fitting batch {lo} rounds down to {answer}, which "
                         f"the model's ghost batch norm cannot normalise; use round_to=None")
    return FinderResult(answer, lo, tried, budget, time.perf_counter() - t0, describe_device(device))


def _virtual_sizes_of(model: nn.Module) -> list[int]:
    return sorted({m.virtual_batch_size for m in model.modules() if hasattr(m, "virtual_sizes")})


def _ghost_accepts(layers: list, accumulate: int, b: int) -> bool:
    k = min(accumulate, b)
    q, r = divmod(b, k)
    for m in {q + 1, q} if r else {q}:   # the micro-batch sizes of a batch of b
        for layer in layers:
            try:
                layer.virtual_sizes(m)
            except ValueError:
                return False
    return True


def _ghost_floor(model: nn.Module, accumulate: int, start: int):
    """``floor(b)``: the largest batch size <= b (and >= start) the ghost layers accept, else None."""
    layers = [m for m in model.modules() if hasattr(m, "virtual_sizes")]
    if not layers:
        return lambda b: b
    cache: dict[int, int | None] = {}

    def floor(b: int) -> int | None:
        if b not in cache:
            cache[b] = next((c for c in range(b, start - 1, -1) if _ghost_accepts(layers, accumulate, c)), None)
        return cache[b]

    return floor


def _ghost_ceiling(model: nn.Module, accumulate: int, start: int, limit: int) -> int:
    layers = [m for m in model.modules() if hasattr(m, "virtual_sizes")]
    return next(c for c in range(start, limit + 1) if not layers or _ghost_accepts(layers, accumulate, c))


def _doubling_bracket(fits, lo: int, limit: int, step: int | None = None):
    """From a fitting ``lo``, grow (doubling, or by a doubling ``step``) to the first failure."""
    while lo < limit:
        b = min(2 * lo if step is None else lo + step, limit)
        if not fits(b):
            return lo, b
        lo = b
        step = None if step is None else 2 * step
    return lo, None


def _guided_bracket(fits, tried: list, start: int, limit: int, allowed: float):
    """Bracket the limit around the prediction of a line through two small trials.

    Real steps still decide: the prediction and its neighbour are tried, then the search gallops
    (steps doubling) up or down from there until it brackets the limit for the bisection.
    """
    second = min(limit, 2 * start)
    if second == start:
        return start, None
    if not fits(second):
        return start, second
    points = [t for t in tried if t.get("total") is not None][-2:]
    line = MemoryModel.fit([t["batch_size"] for t in points], [t["total"] for t in points])
    if line.per_example <= 0:
        return _doubling_bracket(fits, second, limit)
    guess = int(min(limit, max(second, math.floor((allowed - line.fixed) / line.per_example))))
    lo = second
    if guess > lo:
        if not fits(guess):          # the line was optimistic: gallop down from the guess
            hi, step = guess, max(1, guess // 64)
            while hi - step > lo:
                if fits(hi - step):
                    return hi - step, hi
                hi, step = hi - step, 2 * step
            return lo, hi
        lo = guess
    if lo >= limit:
        return lo, None
    if not fits(lo + 1):             # the usual end on the CPU, where the line is exact
        return lo, lo + 1
    return _doubling_bracket(fits, lo + 1, limit, step=max(2, lo // 64))
