"""nbbatch: batch-size behaviour made visible, measurable and controllable in Jupyter.

Importing nbbatch does no work: no device probing, no data loading, no printing.
"""

from . import data, models, norms, schedules
from . import data, memory, models, schedules
from .config import TrainConfig
from .device import resolve_device, seed_everything
from .history import History
from .schedules import Schedule, scale_lr
from .trainer import DivergenceError, Target, Trainer, accuracy
from . import diagnostics

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
    "diagnostics",
    "memory",
    "models",
    "norms",
    "resolve_device",
    "scale_lr",
    "schedules",
    "seed_everything",
    "__version__",
]

from . import geometry, optim  # noqa: E402  (large-batch optimizers; loss-surface geometry)
from .optim import LAMB, LARS  # noqa: E402

__all__ += ["LAMB", "LARS", "geometry", "optim"]
