"""The Trainer: one model, one dataset, one training configuration, and what happened.

The modules, lowest first: ``setup`` (every argument of ``Trainer(...)`` checked and what the
training needs prepared, before any state changes), ``step`` (what the optimizer step uses beside
the Trainer: the online noise-scale probe, the loss scaler, the random generators' state) and
``progress`` (the progress bar of ``fit``), then ``core`` (:class:`Trainer`, its snapshots and
checkpoints). The package re-exports the public names.
"""

from __future__ import annotations

from ..config import RESCHEDULE_OPTIONS
from ..losses import accuracy, mse_loss
from .core import (CHECKPOINT_VERSION, DEFAULT_UNTIL_EPOCHS, EVENTS, DivergenceError, Target, Trainer,
                   TrainerSnapshot, read_checkpoint)

__all__ = ["Trainer", "TrainerSnapshot", "DivergenceError", "Target", "read_checkpoint", "EVENTS",
           "CHECKPOINT_VERSION", "DEFAULT_UNTIL_EPOCHS", "RESCHEDULE_OPTIONS", "accuracy", "mse_loss"]
