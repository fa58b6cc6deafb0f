"""The Trainer: one model, one dataset, one training configuration, and what happened.

The modules, lowest first: ``setup`` (every argument of ``Trainer(...)`` checked and what the
training needs prepared, before any state changes), ``step`` (what the optimizer step uses beside
the Trainer: the online noise-scale probe, the loss scaler, the random generators' state),
``progress`` (the progress bar of ``fit``), ``state`` (snapshots and checkpoint files) and
``stopping`` (``Target``, ``DivergenceError``), then ``core`` (:class:`Trainer`). The package
re-exports the public names.
"""

from __future__ import annotations

from ..config import RESCHEDULE_OPTIONS
from ..losses import accuracy, mse_loss
from .core import CHECKPOINT_VERSION, DEFAULT_UNTIL_EPOCHS, EVENTS, Trainer
from .state import TrainerSnapshot, read_checkpoint
from .stopping import DivergenceError, Target

__all__ = ["Trainer", "TrainerSnapshot", "DivergenceError", "Target", "read_checkpoint", "EVENTS",
           "CHECKPOINT_VERSION", "DEFAULT_UNTIL_EPOCHS", "RESCHEDULE_OPTIONS", "accuracy", "mse_loss"]
