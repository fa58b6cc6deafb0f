"""Batch-norm tooling: ghost batch norm, norm conversion, BN statistics, recalibration."""

from __future__ import annotations

from .stats import (
    NORM_KINDS,
    REMAINDERS,
    BatchNormAccumulationWarning,
    BNCheck,
    BNStatsRecorder,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    batch_stat_noise,
    batch_stats,
    bn_layers,
    check_bn,
    convert_norm,
    norm_layers,
    precise_bn,
    warn_accumulation_with_bn,
)

__all__ = [
    "BNCheck",
    "BNStatsRecorder",
    "BatchNormAccumulationWarning",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "NORM_KINDS",
    "REMAINDERS",
    "batch_stat_noise",
    "batch_stats",
    "bn_layers",
    "check_bn",
    "convert_norm",
    "norm_layers",
    "precise_bn",
    "warn_accumulation_with_bn",
]
