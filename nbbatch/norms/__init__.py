"""Batch-norm tooling: ghost batch norm, norm conversion, BN statistics, recalibration.

* :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` normalise a large batch in fixed-size
  *virtual* batches (Hoffer et al. 2017, "Train longer, generalize better"); in eval mode they
  are ordinary batch norm with running statistics.
* :func:`convert_norm` swaps the normalisation layers of a model (batch, ghost, group, layer, none).
* :func:`bn_layers`, :class:`BNStatsRecorder`, :func:`batch_stats`, :func:`batch_stat_noise` and
  :func:`check_bn` measure what batch norm sees: batch statistics against running estimates,
  their noise against the batch size, and the classic train/eval mistakes.
* :func:`precise_bn` recomputes running statistics over training batches after training.
* :func:`warn_accumulation_with_bn` is what the Trainer calls when it accumulates over a model
  with batch norm: each micro-batch is normalised on its own, so accumulation is then *not* one
  larger batch.

The modules, lowest first: ``ghost`` (the ghost layers), ``layers`` (finding a model's norm
layers, saving and restoring their statistics), ``stats`` (the statistics and :func:`check_bn`),
then ``convert`` (:func:`convert_norm`), ``precise`` (:func:`precise_bn`) and ``accumulation``
(the warning).

Written by hand because torch has no ghost batch norm and no norm conversion other than
``SyncBatchNorm.convert_sync_batchnorm``. ``precise_bn`` does what
``torch.optim.swa_utils.update_bn`` does (reset, then a cumulative average with ``momentum=None``),
but under ``no_grad``, for a bounded number of batches, and restoring the layers' momentum and the
model's mode even when a batch fails.
"""

from __future__ import annotations

from .accumulation import BatchNormAccumulationWarning, warn_accumulation_with_bn
from .convert import CONVERT_TARGETS, convert_norm
from .ghost import REMAINDERS, GhostBatchNorm1d, GhostBatchNorm2d
from .layers import bn_layers, norm_layers
from .precise import precise_bn
from .stats import BNCheck, BNStatsRecorder, batch_stat_noise, batch_stats, check_bn

__all__ = [
    "BNCheck",
    "BNStatsRecorder",
    "BatchNormAccumulationWarning",
    "CONVERT_TARGETS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
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
