"""The losses and the metric the Trainer, MultiRun and the diagnostics share, by name.

``resolve_loss`` turns the ``loss=`` option (``"cross_entropy"``, ``"mse"`` or a callable
``loss(output, target)`` returning a batch mean) into the callable; ``accuracy`` is the metric
recorded for classification. This module sits below everything that trains and imports nothing
of nbbatch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "accuracy", "mse_loss", "resolve_loss"]

LOSSES = ("cross_entropy", "mse")


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest output is the target class.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item()
        0.5
    """
    return (output.argmax(dim=-1) == target).float().mean()


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; an ``(N, 1)`` output is compared with ``(N,)`` targets.

    Example:
        >>> mse_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0])).item()
        2.0
    """
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    return F.mse_loss(output, target)


def resolve_loss(loss) -> Callable:
    """The loss callable for ``loss=``: a name in ``LOSSES`` or a callable ``loss(output, target)``.

    Example:
        >>> resolve_loss("mse") is mse_loss, resolve_loss("cross_entropy") is F.cross_entropy
        (True, True)
        >>> resolve_loss("l1")
        Traceback (most recent call last):
        ...
        ValueError: loss='l1' is not known; use 'cross_entropy', 'mse' or a callable(output, target)
    """
    if isinstance(loss, str):
        if loss == "cross_entropy":
            return F.cross_entropy
        if loss == "mse":
            return mse_loss
        raise ValueError(f"loss={loss!r} is not known; use 'cross_entropy', 'mse' or a callable(output, target)")
    if not callable(loss):
        raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
    return loss
