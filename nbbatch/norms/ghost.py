"""Ghost batch norm: batch norm over fixed-size virtual batches (Hoffer et al. 2017).

:class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` normalise a large batch in fixed-size
*virtual* batches; in eval mode they are ordinary batch norm with running statistics. Written by
hand because torch has no ghost batch norm.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checks import check_int

__all__ = ["GHOST_OF", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostMixin", "REMAINDERS", "layer_factory"]

REMAINDERS = ("merge", "separate", "error")


def layer_factory(layer: nn.Module) -> dict:
    """``device``/``dtype`` keyword arguments that build a layer like ``layer``."""
    ref = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype} if ref.is_floating_point() else {"device": ref.device}


class GhostMixin:
    """Training forward as k separate BatchNorm calls, one per virtual batch (in order).

    Each call normalises its slice with that slice's mean and biased variance and updates the
    running estimates once, exactly as calling the parent BatchNorm k times would: with the
    default momentum 0.1 a batch of k virtual batches moves the running mean k times.
    """

    virtual_batch_size: int
    remainder: str

    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 remainder: str = "merge", device=None, dtype=None) -> None:
        # checked before the parent builds anything
        virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, 2)
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size, self.remainder = virtual_batch_size, remainder

    def virtual_sizes(self, batch_size: int) -> list[int]:
        """The sizes of the virtual batches a training batch of ``batch_size`` is split into.

        ``remainder`` decides what happens when ``virtual_batch_size`` does not divide the batch:
        ``"merge"`` folds the leftover examples into the last virtual batch (every statistic uses
        at least ``virtual_batch_size`` examples), ``"separate"`` normalises them as a smaller
        virtual batch of their own, ``"error"`` raises.
        """
        v = self.virtual_batch_size
        if batch_size < v:
            raise ValueError(f"virtual_batch_size={v} is larger than the batch ({batch_size} examples); "
                             f"use virtual_batch_size <= {batch_size} or a larger batch (drop_last=True "
                             f"avoids a short last batch)")
        k, rest = divmod(batch_size, v)
        if rest == 0:
            return [v] * k
        if self.remainder == "error":
            raise ValueError(f"virtual_batch_size={v} does not divide the batch of {batch_size} examples "
                             f"(remainder='error'); use remainder='merge' or 'separate', or a dividing size")
        if self.remainder == "merge":
            return [v] * (k - 1) + [v + rest]
        if rest < 2:
            raise ValueError(f"virtual_batch_size={v} leaves a virtual batch of 1 example out of {batch_size} "
                             f"(remainder='separate'); batch norm needs at least 2, use remainder='merge'")
        return [v] * k + [rest]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)  # eval: exactly the parent BatchNorm (running statistics)
        self._check_input_dim(x)
        sizes = self.virtual_sizes(x.shape[0])  # raises before any running statistic moves
        if len(sizes) == 1:
            return super().forward(x)
        # x: (N, C, ...) -> slices (v_i, C, ...), each normalised by its own statistics.
        return torch.cat([super(GhostMixin, self).forward(chunk) for chunk in x.split(sizes)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, remainder={self.remainder!r}"

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, virtual_batch_size: int = 32, remainder: str = "merge"):
        """A ghost layer with ``bn``'s settings, affine parameters and running statistics (copied)."""
        ghost = cls(bn.num_features, virtual_batch_size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, remainder=remainder, **layer_factory(bn))
        ghost.load_state_dict(bn.state_dict())
        ghost.train(bn.training)
        return ghost


class GhostBatchNorm1d(GhostMixin, nn.BatchNorm1d):
    """Batch norm over virtual batches of ``virtual_batch_size`` examples, for ``(N, C)`` or ``(N, C, L)``.

    In training mode a batch of ``k * v`` examples gives exactly the outputs, gradients and
    running statistics of ``k`` separate ``nn.BatchNorm1d`` calls on consecutive slices of ``v``
    (Hoffer et al. 2017). In eval mode it *is* ``nn.BatchNorm1d``: the running estimates normalise.
    It is an ``nn.BatchNorm1d`` subclass with the same parameters and buffers, so state dicts move
    between the two and every batch-norm tool (``precise_bn``, ``batch_stats``) applies.

    Args:
        num_features: Channels ``C``.
        virtual_batch_size: Examples per statistic, at least 2 (Goyal et al. 2017 keep 32).
        eps, momentum, affine, track_running_stats: As for ``nn.BatchNorm1d``.
        remainder: ``"merge"``, ``"separate"`` or ``"error"``: what to do when
            ``virtual_batch_size`` does not divide the batch (see :meth:`virtual_sizes`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> gbn, bn = GhostBatchNorm1d(3, virtual_batch_size=4), nn.BatchNorm1d(3)
        >>> x = torch.randn(8, 3)
        >>> torch.allclose(gbn(x), torch.cat([bn(x[:4]), bn(x[4:])]))
        True
        >>> gbn.virtual_sizes(10), gbn.eval()(x).shape
        ([4, 6], torch.Size([8, 3]))
    """


class GhostBatchNorm2d(GhostMixin, nn.BatchNorm2d):
    """Batch norm over virtual batches of ``virtual_batch_size`` examples, for images ``(N, C, H, W)``.

    The 2-D counterpart of :class:`GhostBatchNorm1d` (see there); an ``nn.BatchNorm2d`` subclass.

    Example:
        >>> gbn = GhostBatchNorm2d(4, virtual_batch_size=2)
        >>> gbn(torch.randn(6, 4, 5, 5)).shape, gbn.num_batches_tracked.item()
        (torch.Size([6, 4, 5, 5]), 3)
    """


GHOST_OF = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}
