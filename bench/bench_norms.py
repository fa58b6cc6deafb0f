"""Benchmark: the cost of a training step with each normalisation layer, and of ghost batch norm.

A hand-written SGD loop (forward, cross-entropy, backward, step) on the mnist1d MLP
(40 -> 100 -> 100 -> 10) at one batch size, with the norm slot filled by:

* ``none``            ``nn.Identity``
* ``batch``           ``nn.BatchNorm1d`` (the reference of every ratio)
* ``ghost``           ``nbbatch.norms.GhostBatchNorm1d`` (k separate BatchNorm calls, one per virtual batch)
* ``ghost-vector``    a vectorised ghost BN written here for comparison: the batch viewed as
                      ``(k, v, C)``, statistics in one reduction, running estimates updated with the
                      closed form of k momentum steps. Checked against ``ghost`` before timing.
* ``ghost-fused``     another vectorised ghost BN: the batch rearranged to ``(v, k * C)`` so that one
                      fused ``F.batch_norm`` call normalises every (virtual batch, channel) pair;
                      running estimates as in ``ghost-vector``. Checked against ``ghost`` too.
* ``group``, ``layer`` ``nn.GroupNorm(5, C)`` and ``nn.LayerNorm(C)``

All contenders run in one process, interleaved and rotated per repetition, each warmed up once;
times are medians of per-repetition means.

Run:  .venv/bin/python bench/bench_norms.py [--batch-size 512] [--virtual 32] [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbbatch import models  # noqa: E402
from nbbatch.norms import GhostBatchNorm1d, convert_norm  # noqa: E402


class VectorGhostBatchNorm1d(nn.BatchNorm1d):
    """Ghost BN for (N, C) inputs in one reduction over a (k, v, C) view (training mode only)."""

    def __init__(self, num_features: int, virtual_batch_size: int):
        super().__init__(num_features)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        v = self.virtual_batch_size
        k = x.shape[0] // v
        xv = x.view(k, v, -1)
        mean = xv.mean(1, keepdim=True)                            # (k, 1, C)
        var = xv.var(1, unbiased=False, keepdim=True)
        y = (xv - mean) / (var + self.eps).sqrt() * self.weight + self.bias
        with torch.no_grad():                                     # k momentum steps in closed form
            m = self.momentum
            decay = (1 - m) ** torch.arange(k - 1, -1, -1, dtype=x.dtype, device=x.device)  # (k,)
            self.running_mean.mul_((1 - m) ** k).add_(m * (decay[:, None] * mean[:, 0]).sum(0))
            unbiased = var[:, 0] * v / (v - 1)
            self.running_var.mul_((1 - m) ** k).add_(m * (decay[:, None] * unbiased).sum(0))
            self.num_batches_tracked += k
        return y.reshape_as(x)


class FusedGhostBatchNorm1d(VectorGhostBatchNorm1d):
    """Ghost BN for (N, C) inputs as one F.batch_norm over (v, k * C) columns (training mode only)."""

    def forward(self, x):
        if not self.training:
            return nn.BatchNorm1d.forward(self, x)
        v = self.virtual_batch_size
        k, c = x.shape[0] // v, x.shape[1]
        cols = x.view(k, v, c).transpose(0, 1).reshape(v, k * c)   # column j*C + c: virtual batch j, channel c
        y = F.batch_norm(cols, None, None, self.weight.repeat(k), self.bias.repeat(k), True, 0.0, self.eps)
        with torch.no_grad():
            mean, var = cols.mean(0).view(k, c), cols.var(0).view(k, c)
            m = self.momentum
            decay = (1 - m) ** torch.arange(k - 1, -1, -1, dtype=x.dtype, device=x.device)
            self.running_mean.mul_((1 - m) ** k).add_(m * (decay[:, None] * mean).sum(0))
            self.running_var.mul_((1 - m) ** k).add_(m * (decay[:, None] * var).sum(0))
            self.num_batches_tracked += k
        return y.view(v, k, c).transpose(0, 1).reshape(k * v, c)


def build(kind: str, virtual: int) -> nn.Module:
    torch.manual_seed(0)
    if kind in ("none", "batch", "group", "layer"):
        return models.MLP(norm=kind)
    model = models.MLP(norm="batch")
    if kind == "ghost":
        return convert_norm(model, "ghost", virtual_batch_size=virtual)
    cls = VectorGhostBatchNorm1d if kind == "ghost-vector" else FusedGhostBatchNorm1d
    for i, layer in enumerate(model):
        if isinstance(layer, nn.BatchNorm1d):
            model[i] = cls(layer.num_features, virtual)
    return model


def check_vector_ghost(cls, virtual: int, batch: int) -> float:
    """Max difference between GhostBatchNorm1d and a vectorised version (outputs, grads, buffers)."""
    a, b = GhostBatchNorm1d(100, virtual), cls(100, virtual)
    x = torch.randn(batch, 100) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    diffs = [(ya - yb).abs().max(), (xa.grad - xb.grad).abs().max(),
             (a.running_mean - b.running_mean).abs().max(), (a.running_var - b.running_var).abs().max()]
    return max(d.item() for d in diffs)


def time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--virtual", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    diffs = [check_vector_ghost(cls, args.virtual, args.batch_size)
             for cls in (VectorGhostBatchNorm1d, FusedGhostBatchNorm1d)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}; "
          f"batch {args.batch_size}, virtual batch {args.virtual}; max diff against GhostBatchNorm1d: "
          f"ghost-vector {diffs[0]:.1e}, ghost-fused {diffs[1]:.1e}")
    if max(diffs) > 1e-4:
        raise SystemExit("a vectorised ghost BN disagrees with GhostBatchNorm1d: timings would compare different work")
    kinds = ["none", "batch", "ghost", "ghost-vector", "ghost-fused", "group", "layer"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch_size, 40, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g)
    nets = {k: build(k, args.virtual) for k in kinds}
    for k in kinds:
        time_steps(nets[k], x, y, 5)                                  # warm-up
    times = {k: [] for k in kinds}
    for r in range(args.repeats):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            times[k].append(time_steps(nets[k], x, y, args.steps))
    ref = statistics.median(times["batch"])
    print(f"\n| norm | ms / step (median) | vs batch |\n|---|---:|---:|")
    for k in kinds:
        med = statistics.median(times[k])
        print(f"| {k} | {1e3 * med:.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
