"""Live training controls for Jupyter: panels that train in a background thread.

Importing this package imports ipywidgets and matplotlib (both dependencies of nbbatch); it
starts nothing. JupyterLab itself comes with ``nbbatch[lab]``. ``RunController`` is the widget-free core the panels are thin clients of.
"""

from .compare import RunComparison, compare
from .controller import RunController, RunError
from .panel import TrainingPanel, default_builder
from .plots import LiveFigure, Refresher, snapshot

__all__ = ["LiveFigure", "Refresher", "RunComparison", "RunController", "RunError", "TrainingPanel",
           "compare", "default_builder", "snapshot"]
