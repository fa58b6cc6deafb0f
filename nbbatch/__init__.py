"""nbbatch: batch-size behaviour made visible, measurable and controllable in Jupyter.

Importing nbbatch does no work: no device probing, no data loading, no printing.
"""

from . import data, diagnostics, geometry, memory, models, norms, optim, recipe, runs, schedules
from .config import TrainConfig
from .device import resolve_device, seed_everything
from .distributed import Distributed, launch
from .history import History
from .optim import LAMB, LARS
from .runs import MultiRun
from .schedules import BatchSchedule, Schedule, scale_lr
from .trainer import DivergenceError, Target, Trainer, accuracy

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """``%load_ext nbbatch``: register the ``%nbbatch_env`` and ``%%peakmem`` magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    """``%unload_ext nbbatch``: remove the magics."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "BatchSchedule",
    "Distributed",
    "DivergenceError",
    "History",
    "LAMB",
    "LARS",
    "Schedule",
    "Target",
    "TrainConfig",
    "Trainer",
    "accuracy",
    "data",
    "diagnostics",
    "geometry",
    "launch",
    "memory",
    "models",
    "norms",
    "optim",
    "recipe",
    "resolve_device",
    "scale_lr",
    "schedules",
    "seed_everything",
    "__version__",
    "MultiRun",
    "runs",
]
