"""Benchmark: each gradient-noise-scale estimator against the exact ``B_simple`` of the data set.

Estimators (``nbbatch.diagnostics``), each averaged over many draws at fixed weights:

* exact: ``gradient_noise_scale(model, data)`` (per-example gradients over all N examples);
* sampled: ``gradient_noise_scale(sample=n)`` over many seeds;
* two-batch: ``noise_scale_two_batch(b_small, b_big)`` in blocks of draws over several seeds;
* online: a Trainer at ``lr=0`` (the weights stay put) with ``noise_scale_every=1``.

``B_simple`` of an estimator is its mean ``tr(Sigma)`` over its mean ``|G|^2`` (numerator and
denominator averaged separately, as McCandlish et al. do); its standard error comes from the
delta method over independent blocks (seeds; epochs for the online estimate). The column "1/B
formula" is what McCandlish's infinite-population formula gives on the same draws (both are
linear in the squared norms, so it is recovered exactly from the corrected estimates).

Cases:

* ``small``: linear regression, N = 48, the weights off the optimum (B_simple / N = 0.17);
* ``mnist1d``: the MLP 40-100-100-10 trained as notebook 02 does (batch 128, lr 0.1, momentum,
  200 steps: training loss about 1.0), N = 4000.

Run:  .venv/bin/python bench/bench_noise_estimators.py [--case small|mnist1d|all] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbbatch  # noqa: E402
from nbbatch import Trainer, data, models, seed_everything  # noqa: E402
from nbbatch.diagnostics import gradient_noise_scale, noise_scale_two_batch  # noqa: E402
from nbbatch.noise import sampling_factor, two_batch_estimate  # noqa: E402


def ratio_and_se(g2_blocks, tr_blocks) -> tuple[float, float, float, float]:
    """(mean |G|^2, mean tr, B = mean tr / mean |G|^2, se of B by the delta method) over blocks."""
    k = len(g2_blocks)
    g, t = statistics.fmean(g2_blocks), statistics.fmean(tr_blocks)
    b = t / g
    if k < 2:
        return g, t, b, math.nan
    vg, vt = statistics.variance(g2_blocks) / k, statistics.variance(tr_blocks) / k
    cov = sum((x - g) * (y - t) for x, y in zip(g2_blocks, tr_blocks)) / (k - 1) / k
    return g, t, b, abs(b) * math.sqrt(max(vt / t ** 2 + vg / g ** 2 - 2 * cov / (g * t), 0.0))


def one_over_b(g2, tr, b_small, b_big, n):
    """McCandlish's 1/B formula on the same squared norms the corrected estimates came from."""
    s2 = tr * n / (n - 1)
    return two_batch_estimate(g2 + sampling_factor(b_small, n) * s2, g2 + sampling_factor(b_big, n) * s2,
                              b_small, b_big)


def row(name, g2_blocks, tr_blocks, exact_b, naive=None, seconds=None):
    g, t, b, se = ratio_and_se(g2_blocks, tr_blocks)
    cells = [name, f"{g:.4g}", f"{t:.4g}", f"{b:.4g} ± {se:.2g}" if se == se else f"{b:.4g}",
             f"{b / exact_b:.3f}"]
    if naive is not None:
        ng, nt = naive
        cells.append(f"{nt / ng:.4g} ({nt / ng / exact_b:.3f})")
    else:
        cells.append("")
    cells.append("" if seconds is None else f"{seconds:.0f}")
    print("| " + " | ".join(cells) + " |", flush=True)


def measure(model, d, loss, *, sample, seeds_sampled, two, blocks_two, draws_two, online, online_steps):
    x, y = d
    n = len(x)
    exact = gradient_noise_scale(model, d, loss=loss)
    print(f"\nN = {n}, exact |G|^2 = {exact.grad_sq:.4g}, tr(Sigma) = {exact.trace:.4g}, "
          f"B_simple = {exact.b_simple:.4g} (B_simple / N = {exact.b_simple / n:.3f})\n")
    print("| estimator | mean |G|^2 | mean tr(Sigma) | B_simple ± se | / exact | 1/B formula (/ exact) | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    row("exact (per-example, all N)", [exact.grad_sq], [exact.trace], exact.b_simple)

    c0 = time.thread_time()
    runs = [gradient_noise_scale(model, d, loss=loss, sample=sample, seed=s) for s in range(seeds_sampled)]
    g2 = [r.grad_sq for r in runs]
    tr = [r.trace for r in runs]
    # the former sample formulas: tr = s^2 (scatter over n-1), |G|^2 = |mean|^2 - s^2/n
    s2 = [t * n / (n - 1) for t in tr]
    naive = (statistics.fmean(g - s / n for g, s in zip(g2, s2)), statistics.fmean(s2))
    row(f"sampled (n = {sample}, {seeds_sampled} seeds)", g2, tr, exact.b_simple, naive, time.thread_time() - c0)

    c0 = time.thread_time()
    b_small, b_big = two
    ests = [noise_scale_two_batch(model, d, b_small, b_big, draws=draws_two, loss=loss, seed=s)
            for s in range(blocks_two)]
    g2 = [e.grad_sq for e in ests]
    tr = [e.trace for e in ests]
    naive = one_over_b(statistics.fmean(g2), statistics.fmean(tr), b_small, b_big, n)
    row(f"two-batch ({b_small} vs {b_big}, {blocks_two} x {draws_two} draws)", g2, tr, exact.b_simple, naive,
        time.thread_time() - c0)

    c0 = time.thread_time()
    batch_size, accumulate = online
    t = Trainer(model, d, batch_size=batch_size, accumulate=accumulate, lr=0.0, optimizer="sgd", loss=loss,
                noise_scale_every=1, noise_scale_smoothing=0.0, seed=0, device="cpu", drop_last=True)
    t.fit(steps=online_steps)
    rows = t.history.steps
    per_epoch = t.steps_per_epoch
    g2_all, tr_all = rows["noise_grad_sq"], rows["noise_trace"]
    blocks = len(g2_all) // per_epoch
    g2 = [statistics.fmean(g2_all[i * per_epoch:(i + 1) * per_epoch]) for i in range(blocks)]
    tr = [statistics.fmean(tr_all[i * per_epoch:(i + 1) * per_epoch]) for i in range(blocks)]
    b_s = batch_size // max(accumulate, 2)
    naive = one_over_b(statistics.fmean(g2), statistics.fmean(tr), b_s, batch_size, n)
    row(f"online ({b_s} vs {batch_size}, {blocks * per_epoch} steps)", g2, tr, exact.b_simple, naive,
        time.thread_time() - c0)


def small_case(scale):
    torch.manual_seed(0)
    x = torch.randn(48, 3)
    y = x @ torch.ones(3) + 0.5 * torch.randn(48)
    model = nn.Linear(3, 1, bias=False)
    nn.init.constant_(model.weight, 1.15)
    print("\n### small: linear regression, N = 48 (weights 1.15, the optimum near 1)")
    measure(model, (x, y), "mse", sample=12, seeds_sampled=int(4000 * scale), two=(2, 8), blocks_two=20,
            draws_two=int(4000 * scale), online=(24, 2), online_steps=int(40000 * scale))


def mnist1d_case(scale):
    d = data.mnist1d()
    seed_everything(0)
    warm = Trainer(models.MLP(), d, batch_size=128, lr=0.1, optimizer="momentum", seed=0, device="cpu")
    warm.fit(steps=200)
    loss = warm.evaluate("train")["loss"]
    print(f"\n### mnist1d: MLP 40-100-100-10 after 200 steps (batch 128, lr 0.1, momentum): training loss {loss:.3f}")
    measure(warm.model, (d.x_train, d.y_train), "cross_entropy", sample=400, seeds_sampled=int(400 * scale),
            two=(32, 1024), blocks_two=20, draws_two=int(200 * scale), online=(256, 8),
            online_steps=int(6000 * scale))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("small", "mnist1d", "all"), default="all")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every number of draws")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# nbbatch {nbbatch.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
    if args.case in ("small", "all"):
        small_case(args.scale)
    if args.case in ("mnist1d", "all"):
        mnist1d_case(args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
