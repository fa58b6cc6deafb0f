"""A trainer's saved state: ``TrainerSnapshot`` held in memory, and ``read_checkpoint`` for a file."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .core import Trainer


class TrainerSnapshot:
    """A trainer's training state held in memory, from ``Trainer.snapshot()`` for ``Trainer.restore``."""

    __slots__ = ("trainer", "state", "grads", "modes", "schedule", "batches")

    def __init__(self, trainer: Trainer, state: dict, grads: list, modes: list, schedule, batches):
        self.trainer, self.state, self.grads, self.modes = trainer, state, grads, modes
        self.schedule, self.batches = schedule, batches

    @property
    def step(self) -> int:
        """The step the trainer had completed when the snapshot was taken."""
        return self.state["progress"]["step"]

    def __repr__(self) -> str:
        return f"TrainerSnapshot(step={self.step})"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU."""
    import pickle

    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise type(err)(err.errno, f"cannot read the checkpoint ({err.strerror})", path) from None
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which would run whatever code the file holds:
        # never pass that advice on.
        if "global" not in str(err).lower():   # not a refused object: bytes that are no pickle at all
            raise ValueError(f"{path!r} is not a readable nbbatch checkpoint (damaged, truncated or another kind "
                             f"of file)") from None
        raise ValueError(f"{path!r} is not a safe nbbatch checkpoint: it holds objects other than tensors and "
                         f"plain values, so it was not unpickled. Load only checkpoints written by Trainer.save "
                         f"from a source you trust") from None
    except (RuntimeError, AttributeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{path!r} is not a readable nbbatch checkpoint (damaged, truncated or another kind of "
                         f"file: {type(err).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "progress" not in state:
        raise ValueError(f"{path!r} is not an nbbatch checkpoint")
    return state
