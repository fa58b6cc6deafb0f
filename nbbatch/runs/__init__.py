"""Many runs as one: R runs of one architecture trained in one vectorised step."""

from __future__ import annotations

from .multirun import MULTIRUN_OPTIMIZERS, PER_RUN_OPTIONS, MultiRun

__all__ = ["MultiRun", "PER_RUN_OPTIONS", "MULTIRUN_OPTIMIZERS"]
