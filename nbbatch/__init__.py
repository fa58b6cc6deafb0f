"""nbbatch: batch-size behaviour made visible, measurable and controllable in Jupyter.

Importing nbbatch does no work: no device probing, no data loading, no printing.
"""

from . import data, memory, models, schedules
from .config import TrainConfig
from .device import resolve_device, seed_everything
from .history import History
from .schedules import Schedule, scale_lr
from .trainer import DivergenceError, Target, Trainer, accuracy

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "History",
    "Schedule",
    "Target",
    "TrainConfig",
    "Trainer",
    "accuracy",
    "data",
    "memory",
    "models",
    "resolve_device",
    "scale_lr",
    "schedules",
    "seed_everything",
    "__version__",
]
