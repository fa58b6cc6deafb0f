"""Memory and throughput against batch size: measure, model, find, trade off, plan.

- :func:`measure` runs real Trainer steps at a list of batch sizes and reports peak training-step
  memory with its parts, time per step and examples per second (:class:`MemoryReport`).
  On CUDA the peak comes from the caching allocator (``max_memory_allocated`` after a reset).
  On the CPU, which keeps no allocator statistics, it comes from exact accounting
  (:func:`account_step`): parameters and buffers + gradients + optimizer state + the tensors
  autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` with
  each storage counted once, at the moment the most of them are alive.
- :class:`MemoryModel` fits ``fixed + per_example * B`` to those points; ``max_batch_size``
  answers "what fits in this budget".
- :func:`find_max_batch_size` searches (grow then bisect, or guided by a line through two small
  trials) for the largest batch whose real training step fits, restoring model, optimizer and
  RNG state afterwards.
- :func:`find_knee` and :func:`fit_step_time` mark where doubling the batch stops nearly
  doubling throughput.
- :func:`checkpointed` wraps an ``nn.Sequential`` for activation checkpointing
  (``torch.utils.checkpoint``), the Trainer's ``checkpoint_segments`` option;
  :class:`Checkpointed` marks single blocks of any model (both defined in ``nbbatch.recompute``,
  below the Trainer, with the saved-tensor counter; re-exported here).
- :func:`compare_configs` measures training configurations side by side; :func:`plan` turns a
  batch size and a budget into micro-batch, accumulation, learning rate and warm-up
  (``Trainer.from_plan``).

The modules, lowest first: ``accounting`` (:class:`MemoryParts`, :func:`account_step`),
``model`` (:class:`MemoryModel` and the budget checks), ``throughput`` (the knee),
``trials`` (the trial steps measure and the finder run), ``measurement``
(:func:`measure`), ``finder``, ``comparison``, ``planner``.

Written by hand: the saved-tensor accounting (no maintained library counts the bytes a CPU
training step keeps alive) and the batch-size search (the peers' versions are tied to their
trainers). Everything else is torch: ``torch.utils.checkpoint``, ``torch.autocast``,
``torch.cuda`` memory statistics.
"""

from __future__ import annotations

# activation recomputation lives below the Trainer (nbbatch.recompute); its names are importable from here too
from ..recompute import Checkpointed, CheckpointedSequential, checkpointed
from .accounting import MemoryParts, account_step
from .comparison import ConfigComparison, compare_configs
from .finder import FinderResult, find_max_batch_size
from .measurement import MemoryReport, measure
from .model import MemoryModel
from .planner import Plan, plan
from .throughput import find_knee, fit_step_time

__all__ = [
    "Checkpointed",
    "CheckpointedSequential",
    "ConfigComparison",
    "FinderResult",
    "MemoryModel",
    "MemoryParts",
    "MemoryReport",
    "Plan",
    "account_step",
    "checkpointed",
    "compare_configs",
    "find_knee",
    "find_max_batch_size",
    "fit_step_time",
    "measure",
    "plan",
]
