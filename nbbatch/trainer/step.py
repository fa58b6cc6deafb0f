"""What the optimizer step uses beside the Trainer: the online noise-scale probe, the loss scaler,
the non-finite check, the random generators' state and a saved position in an epoch."""

from __future__ import annotations

from typing import Mapping

import torch

from ..noise import OnlineNoiseScale, squared_grad_norm


class NoiseProbe:
    """The online gradient noise scale (``noise_scale_every``), watching a step's micro-batch gradients.

    On a measured step it reads the squared gradient norm after the first micro-batch's backward
    (the small batch) and after the last one (the big batch, all-reduced when data-parallel);
    ``OnlineNoiseScale`` turns the pair into the History's columns. With the option off every
    call does nothing and the rows get no noise columns.
    """

    def __init__(self, online: OnlineNoiseScale | None, params: list[torch.Tensor], world: int):
        self.online, self.params, self.world = online, params, world
        self.idle = {} if online is None else online.EMPTY   # the columns of an unmeasured step
        self.due = False
        self.b_small = 0
        self.sq_small: torch.Tensor | None = None

    def split(self, step: int, k: int, local: int) -> int:
        """The micro-batches to run: ``k``, or two on a measured step that would run one."""
        self.due = self.online is not None and self.online.due(step) and local > 1
        if self.due and k == 1:
            return 2   # the estimate needs a smaller batch: two half-batches (the same update up to rounding)
        return k

    def after_first(self, b_small: int, n: int) -> None:
        if self.due:
            # .grad now holds (m*W/n) * g_small, the first micro-batch's mean gradient, weighted
            # (not yet all-reduced: the first micro-batch runs under no_sync when data-parallel)
            self.b_small = b_small
            self.sq_small = squared_grad_norm(self.params) * (n / (b_small * self.world)) ** 2

    def measure(self, n: int, scaler) -> dict:
        """After the last backward: this step's noise-scale columns for the History."""
        if not self.due:
            return self.idle
        self.due = False
        # fp16: the gradients are scaled by the loss scale (1.0 without fp16), and an overflowed
        # step reaches here (the scaler skips it): its inf/nan norms would poison the EMA for the
        # rest of the run, so such a step records nothing.
        scale2 = scaler.get_scale() ** 2
        sq_small, sq_big = self.sq_small / scale2, squared_grad_norm(self.params) / scale2
        if not bool(torch.isfinite(sq_small) & torch.isfinite(sq_big)):
            return self.online.EMPTY
        return self.online.record(sq_small, sq_big, self.b_small, n)

    def rebuild(self, steps) -> None:
        """Recompute the EMA from a History's step table (after loading a state)."""
        if self.online is not None:
            self.online.rebuild(steps)


def flag_nonfinite(tensors: list[torch.Tensor], found: torch.Tensor, one: torch.Tensor) -> None:
    """Set ``found`` to 1 when any element of ``tensors`` is inf or nan (one fused pass where torch has it)."""
    if not tensors:
        return
    try:
        # GradScaler's own check: multiplies by 1.0 (exact) and flags any inf/nan.
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    except (AttributeError, RuntimeError, NotImplementedError):  # older torch or another backend
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            found.fill_(1.0)


def grad_scaler(device: torch.device, enabled: bool):
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover - torch < 2.3


def fresh_scaler(scaler, device: torch.device):
    """A new scaler with ``scaler``'s state (scale, growth tracker), forgetting any half-done step."""
    fresh = grad_scaler(device, enabled=scaler.is_enabled())
    fresh.load_state_dict(scaler.state_dict())   # a disabled one ignores it
    return fresh


def rng_state() -> tuple:
    """The global CPU generator's state, and the CUDA generators' where CUDA is in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def resume_position(source, progress: Mapping, batch_size: int) -> tuple[int, int] | None:
    """(batch_in_epoch, example_in_epoch) of a saved progress in ``source``'s epoch, or None if past its end.

    The example position is what the data follows; the batch index is recounted from it, so a
    checkpoint resumes exactly even where this trainer's batch size for that epoch differs.
    """
    epoch, batch = progress["epoch"], progress["batch_in_epoch"]
    example = progress.get("example_in_epoch")
    if example is None:   # written before positions were counted in examples: one batch size per epoch
        example = batch * (source.batch_size_at(epoch) or batch_size)
    if isinstance(example, bool) or not isinstance(example, int) or example < 0:
        return None
    if source.kind == "loader":   # batches of the loader's making: its count is the position
        return batch, example
    left = source.steps_left(epoch, example)
    return (source.steps_in_epoch(epoch) - left, example) if left > 0 else None
