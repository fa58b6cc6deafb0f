"""The noise-scale estimators are unbiased for a finite data set (batches drawn without replacement).

Each estimator's mean over many draws is compared with the exact ``|G|^2`` and ``tr(Sigma)`` of the
data set (from per-example gradients computed here with plain autograd, one example at a time) on
small data sets where ``B_simple / N >= 0.1``, within a few Monte-Carlo standard errors. The
standard error of one draw comes from a vectorised simulation of the same draws (batch means of the
per-example gradients); the same simulation shows that McCandlish's ``1/B`` formula (the
infinite-population limit) would miss the exact values by many standard errors.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler

from helpers import PairDataset
from nbbatch import Trainer
from nbbatch.diagnostics import gradient_noise_scale, noise_scale_two_batch
from nbbatch.noise import OnlineNoiseScale, sampling_factor, two_batch_estimate
from nbbatch.distributed import launch

Z = 4.0          # the band: this many standard errors of the mean


def regression(n=48, seed=0):
    """The reproduction case: N = 48, a linear model off its optimum (exact |G|^2 0.386, B_simple 8.3)."""
    torch.manual_seed(seed)
    x = torch.randn(n, 3)
    y = x @ torch.ones(3) + 0.5 * torch.randn(n)
    model = nn.Linear(3, 1, bias=False)
    nn.init.constant_(model.weight, 1.15)
    return model, x, y


def per_example_grads(model, x, y):
    """(N, P) float64: the gradient of each example's squared error, one autograd call per example
    on a float64 copy of the model and data."""
    model = copy.deepcopy(model).double()
    rows = []
    for xi, yi in zip(x.double(), y.double()):
        model.zero_grad()
        ((model(xi[None]).squeeze(-1) - yi[None]) ** 2).mean().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    return torch.stack(rows)


def exact(g):
    """|G|^2 and tr(Sigma) = mean |g_i - G|^2 of the data set."""
    mean = g.mean(0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())


def batch_sq_norms(g, b, draws, gen):
    """Squared norms of the mean gradient of `draws` batches of b examples drawn without replacement."""
    idx = torch.rand(draws, len(g), generator=gen).argsort(1)[:, :b]
    return (g[idx].mean(1) ** 2).sum(1)


def simulate(g, b_small, b_big, population, draws=200_000, seed=0):
    """Per-draw two-batch estimates (grad_sq, trace) for independent small and big batches."""
    gen = torch.Generator().manual_seed(seed)
    small, big = batch_sq_norms(g, b_small, draws, gen), batch_sq_norms(g, b_big, draws, gen)
    return two_batch_estimate(small, big, b_small, b_big, population)


def assert_within(mean, target, se, what):
    assert abs(mean - target) <= Z * se, f"{what}: mean {mean:.5g} vs exact {target:.5g} (se {se:.3g})"


# ------------------------------------------------------------------------------ the formula
def test_sampling_factor_is_the_variance_of_a_mean_without_replacement():
    # enumerate every batch of 2 of 5 scalar values: E (mean - mu)^2 = (1/B - 1/N) S^2
    v = torch.tensor([0.0, 1.0, 3.0, 4.0, 7.0], dtype=torch.float64)
    pairs = torch.combinations(torch.arange(5), 2)
    var_of_mean = float(((v[pairs].mean(1) - v.mean()) ** 2).mean())
    s2 = float(v.var(unbiased=True))
    assert var_of_mean == pytest.approx(sampling_factor(2, 5) * s2, rel=1e-12)
    assert sampling_factor(4) == 0.25 and sampling_factor(5, 5) == 0.0
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        sampling_factor(0)
    with pytest.raises(ValueError, match="population must be an int >= batch=8 or None, got 4"):
        sampling_factor(8, 4)


def test_two_batch_estimate_is_exact_in_expectation_by_enumeration():
    # every (small, big) pair of batches of a 6-example data set: the corrected estimate averages
    # to the exact values; the 1/B formula does not
    torch.manual_seed(0)
    g = torch.randn(6, 2, dtype=torch.float64) + torch.tensor([0.3, -0.2], dtype=torch.float64)
    g2_exact, tr_exact = exact(g)
    sq = {b: (g[torch.combinations(torch.arange(6), b)].mean(1) ** 2).sum(1).mean() for b in (2, 4)}
    g2, tr = two_batch_estimate(sq[2], sq[4], 2, 4, population=6)
    assert float(g2) == pytest.approx(g2_exact, rel=1e-10) and float(tr) == pytest.approx(tr_exact, rel=1e-10)
    g2_inf, tr_inf = two_batch_estimate(sq[2], sq[4], 2, 4)
    assert abs(float(g2_inf) - g2_exact) > 0.05 * g2_exact and abs(float(tr_inf) - tr_exact) > 0.05 * tr_exact


def test_two_batch_estimate_checks_the_population():
    for bad in (7, 0, 8.0, "48"):
        with pytest.raises(ValueError, match="population must be an int >= b_big=8"):
            two_batch_estimate(1.0, 1.0, 2, 8, population=bad)
    assert two_batch_estimate(2.0, 1.0, 2, 8, population=8)[0] == pytest.approx(1.0)   # big batch = data set


def test_sampled_and_two_batch_estimators_share_one_formula():
    # gradient_noise_scale(sample=n) is the two-batch formula with the small batch shrunk to a sample
    # of n and the big one the whole data set (|g_N|^2 = |G|^2): both give |G|^2 exactly there
    model, x, y = regression()
    ns = gradient_noise_scale(model, (x, y), loss="mse")
    g = per_example_grads(model, x, y)
    g2, tr = exact(g)
    assert ns.grad_sq == pytest.approx(g2, rel=1e-5) and ns.trace == pytest.approx(tr, rel=1e-5)
    assert ns.trace / ns.grad_sq / len(x) >= 0.1            # the regime this module is about
    full_sq = float(g.mean(0) @ g.mean(0))
    sub = g[:12]
    s2 = float(((sub - sub.mean(0)) ** 2).sum() / 11)
    sampled_g2 = float(sub.mean(0) @ sub.mean(0)) - sampling_factor(12, 48) * s2
    sq_small = float(sub.mean(0) @ sub.mean(0))
    g2_tb, _ = two_batch_estimate(sq_small, full_sq, 12, 48, population=48)
    # the two-batch form with the big batch = the data set estimates S^2 from the two norms; the
    # sampled one from the sample's own scatter: the same c_B weighs both
    assert g2_tb == pytest.approx(full_sq, rel=1e-12)
    assert sampled_g2 == pytest.approx(float(sub.mean(0) @ sub.mean(0)) - (1 / 12 - 1 / 48) * s2, rel=1e-12)


# ------------------------------------------------------------------------------ the estimators
def test_the_reproduction_case_two_batch_estimate_is_unbiased():
    model, x, y = regression()
    g = per_example_grads(model, x, y)
    g2_exact, tr_exact = exact(g)
    assert g2_exact == pytest.approx(0.3861, abs=1e-3) and tr_exact / g2_exact == pytest.approx(8.30, abs=0.01)
    draws = 12_000
    est = noise_scale_two_batch(model, (x, y), 2, 8, draws=draws, loss="mse", seed=1)
    sim_g2, sim_tr = simulate(g, 2, 8, population=48)
    se_g2, se_tr = float(sim_g2.std()) / draws ** 0.5, float(sim_tr.std()) / draws ** 0.5
    assert_within(est.grad_sq, g2_exact, se_g2, "two-batch |G|^2")
    assert_within(est.trace, tr_exact, se_tr, "two-batch tr(Sigma)")
    # the simulation itself agrees (a check of the reference), and the 1/B formula fails the same band
    assert_within(float(sim_g2.mean()), g2_exact, float(sim_g2.std()) / 200_000 ** 0.5, "simulated |G|^2")
    inf_g2, inf_tr = uncorrected(est.grad_sq, est.trace, 2, 8, 48)        # the 1/B formula, same draws
    assert abs(inf_g2 - g2_exact) > Z * se_g2                                 # |G|^2 about 0.31
    assert inf_tr / inf_g2 > 1.15 * tr_exact / g2_exact                        # B_simple about 10.5 vs 8.3


def test_sampled_estimator_is_unbiased_where_b_simple_is_a_large_part_of_the_data():
    model, x, y = regression()
    g = per_example_grads(model, x, y)
    g2_exact, tr_exact = exact(g)
    seeds, n = 400, 24
    runs = [gradient_noise_scale(model, (x, y), loss="mse", sample=n, seed=s) for s in range(seeds)]
    g2 = torch.tensor([r.grad_sq for r in runs], dtype=torch.float64)
    tr = torch.tensor([r.trace for r in runs], dtype=torch.float64)
    assert_within(float(g2.mean()), g2_exact, float(g2.std()) / seeds ** 0.5, "sampled |G|^2")
    assert_within(float(tr.mean()), tr_exact, float(tr.std()) / seeds ** 0.5, "sampled tr(Sigma)")
    # the uncorrected sample formulas (scatter over n - 1, |G|^2 = |mean|^2 - s^2/n) are off by many se
    gen = torch.Generator().manual_seed(0)
    idx = torch.rand(100_000, 48, generator=gen).argsort(1)[:, :n]
    sub = g[idx]
    s2 = ((sub - sub.mean(1, keepdim=True)) ** 2).sum((1, 2)) / (n - 1)
    naive_g2 = (sub.mean(1) ** 2).sum(1) - s2 / n
    assert abs(float(naive_g2.mean()) - g2_exact) > Z * float(g2.std()) / seeds ** 0.5


def uncorrected(g2, tr, b_small, b_big, population):
    """What McCandlish's 1/B formula gives on the same draws: the squared norms are recovered from the
    corrected estimates (both are linear in them), then inverted with c_B = 1/B."""
    s2 = tr * population / (population - 1)
    sq_small = g2 + sampling_factor(b_small, population) * s2
    sq_big = g2 + sampling_factor(b_big, population) * s2
    return two_batch_estimate(sq_small, sq_big, b_small, b_big)


def block_mean_and_se(values, block):
    """Mean and standard error from the means of consecutive blocks (the epochs: batches within one
    are drawn from one permutation, so they are not independent; epochs are)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    blocks = v[: len(v) // block * block].reshape(-1, block).mean(1)
    return float(v.mean()), float(blocks.std()) / len(blocks) ** 0.5


def fit_noise(data, batch_size, steps, accumulate=1, **options):
    model, _, _ = regression()
    t = Trainer(model, data, batch_size=batch_size, lr=0.0, optimizer="sgd", loss="mse", accumulate=accumulate,
                noise_scale_every=1, noise_scale_smoothing=0.0, seed=0, device="cpu", **options)
    t.fit(steps=steps)
    rows = t.history.steps
    assert set(rows["batch_size"]) == {batch_size}
    return rows["noise_grad_sq"], rows["noise_trace"]


def check_online(g2, tr, g, b_small, b_big, per_epoch):
    """The recorded estimates average to the exact values; the 1/B formula on the same draws does not."""
    g2_exact, tr_exact = exact(g)
    mean_g2, se_g2 = block_mean_and_se(g2, per_epoch)
    mean_tr, se_tr = block_mean_and_se(tr, per_epoch)
    assert_within(mean_g2, g2_exact, se_g2, "online |G|^2")
    assert_within(mean_tr, tr_exact, se_tr, "online tr(Sigma)")
    inf_g2, _ = uncorrected(torch.tensor(g2, dtype=torch.float64), torch.tensor(tr, dtype=torch.float64),
                            b_small, b_big, len(g))
    mean_inf, se_inf = block_mean_and_se(inf_g2, per_epoch)
    assert abs(mean_inf - g2_exact) > Z * se_inf, f"the 1/B formula passes too: {mean_inf:.4g} (se {se_inf:.3g})"


@pytest.mark.parametrize("source, accumulate, b_small", [
    ("tensors", 1, 12),         # two half-batches of 12 against the batch of 24
    ("tensors", 4, 6),          # the first micro-batch of 6 against the accumulated 24
    ("dataset", 1, 12),         # a map-style Dataset: N = len(dataset)
    ("loader", 2, 12),          # a shuffling DataLoader: N = len(loader.dataset)
])
def test_online_estimate_is_unbiased_for_the_data_set(source, accumulate, b_small):
    model, x, y = regression()
    g = per_example_grads(model, x, y)
    data = {"tensors": (x, y), "dataset": PairDataset(x, y),
            "loader": DataLoader(PairDataset(x, y), batch_size=24, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))}[source]
    g2, tr = fit_noise(data, 24, 1200, accumulate)
    check_online(g2, tr, g, b_small, 24, per_epoch=2)


def test_online_estimate_of_a_loader_with_replacement_uses_the_one_over_b_approximation():
    # independent draws: E|g_B|^2 = |G|^2 + tr(Sigma)/B, which the 1/B formula inverts exactly
    model, x, y = regression()
    sampler = RandomSampler(PairDataset(x, y), replacement=True, num_samples=48,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(PairDataset(x, y), batch_size=24, sampler=sampler)
    g = per_example_grads(model, x, y)
    g2_exact, tr_exact = exact(g)
    g2, tr = fit_noise(loader, 24, 1200)
    mean_g2, se_g2 = block_mean_and_se(g2, 2)
    mean_tr, se_tr = block_mean_and_se(tr, 2)
    assert_within(mean_g2, g2_exact, se_g2, "online |G|^2 (replacement)")
    assert_within(mean_tr, tr_exact, se_tr, "online tr(Sigma) (replacement)")


def online_in_worker(steps):
    torch.set_num_threads(1)
    model, x, y = regression()
    t = Trainer(model, (x, y), batch_size=24, lr=0.0, optimizer="sgd", loss="mse",
                noise_scale_every=1, noise_scale_smoothing=0.0, seed=0, device="cpu")
    t.fit(steps=steps)
    return t.history.steps["noise_grad_sq"], t.history.steps["noise_trace"], t.history.steps["batch_size"]


def test_online_estimate_is_unbiased_under_data_parallelism():
    # two processes share a global batch of 24 (12 each); each one's small batch is the first half of
    # its share (6 examples), the big batch the global one; N is the whole training set (48)
    ranks = launch(online_in_worker, nprocs=2, args=(1200,), timeout=240)
    model, x, y = regression()
    g = per_example_grads(model, x, y)
    for g2, tr, sizes in ranks:
        assert set(sizes) == {24}
        check_online(g2, tr, g, 6, 24, per_epoch=2)
    assert ranks[0][0] != ranks[1][0]      # each process measured its own small batch


def test_online_noise_scale_checks_the_population():
    with pytest.raises(ValueError, match="population must be a positive int"):
        OnlineNoiseScale(1, population=0)
    with pytest.raises(ValueError, match="population must be an int >= b_big=64"):
        OnlineNoiseScale(1, population=32).record(torch.tensor(2.0), torch.tensor(1.0), 4, 64)


def test_a_loader_with_its_own_batch_sampler_uses_the_one_over_b_formula():
    # a custom batch sampler draws in a way the Trainer cannot know: the recorded estimate is the
    # 1/B formula applied to the two squared norms, which are computed here by hand
    model, x, y = regression()
    batches = [list(range(0, 24)), list(range(24, 48))]
    loader = DataLoader(PairDataset(x, y), batch_sampler=batches)
    t = Trainer(copy.deepcopy(model), loader, batch_size=24, lr=0.0, optimizer="sgd", loss="mse",
                noise_scale_every=1, noise_scale_smoothing=0.0, seed=0, device="cpu")
    t.fit(steps=2)
    g = per_example_grads(model, x, y)
    for step, idx in enumerate(batches):
        sq_small = float((g[idx[:12]].mean(0) ** 2).sum())
        sq_big = float((g[idx].mean(0) ** 2).sum())
        g2, tr = two_batch_estimate(sq_small, sq_big, 12, 24)
        assert t.history.steps["noise_grad_sq"][step] == pytest.approx(g2, rel=1e-4)
        assert t.history.steps["noise_trace"][step] == pytest.approx(tr, rel=1e-4)
