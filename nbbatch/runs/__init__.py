"""Many runs as one: R runs of one architecture trained in one vectorised step.

On the small models a workshop uses, a training step is mostly fixed per-step overhead, so R
runs one after another cost R times that overhead. ``MultiRun`` stacks the R models' parameters
along a leading run dimension (``torch.func.stack_module_state``) and trains them together:

* forward: an ``nn.Sequential`` of ``Linear``, ``Flatten``, elementwise activations and
  ``Dropout`` (``models.MLP``) runs as batched matrix products (``torch.baddbmm``) on the stacked
  weights; any other model runs through ``torch.func.vmap`` over ``functional_call`` (measured:
  the batched products are about 1.3-1.5x faster than vmap for the MLP, see ``bench/RESULTS.md``);
* backward: plain autograd on the sum of the R per-run mean losses (the runs share no
  parameter, so each run's gradient is exactly its own);
* update: SGD / momentum / Nesterov / Adam / AdamW written with ``torch._foreach`` ops on the
  stacked tensors, with per-run learning rate, momentum and weight decay as ``(R, 1, ...)``
  tensors. torch.optim keeps one hyperparameter per group and cannot take a per-row one, so the
  update rules are written by hand here, following torch.optim's single-tensor formulas.

Per run: seed (initial weights and data order), lr, momentum, weight decay, the warm-up and decay
schedule (``nbbatch.schedules``) and the LR scaling rule. Shared: architecture, batch size,
optimizer kind, betas/eps, precision, device, loss and metrics. A run whose loss or gradient is
non-finite is marked diverged and frozen at its last finite step while the others go on.

The modules, lowest first: ``engines`` (the batched-product and vmap forwards, the checks that
choose between them) and ``optimizers`` (the update rules), then ``multirun`` (:class:`MultiRun`).
"""

from __future__ import annotations

from .multirun import PER_RUN_OPTIONS, MultiRun
from .optimizers import MULTIRUN_OPTIMIZERS

__all__ = ["MultiRun", "PER_RUN_OPTIONS", "MULTIRUN_OPTIMIZERS"]
