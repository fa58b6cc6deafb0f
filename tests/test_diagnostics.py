"""Gradient noise scale estimators against a closed form, sweeps, the critical-batch fit and lr_find.

The reference problem: linear regression ``y = x . w_true + sigma * eps`` with ``x ~ N(0, I_D)`` and
``eps ~ N(0, 1)``, at fixed weights ``w = w_true + d``. For the per-example loss ``(x . w - y)^2``
the gradient is ``g = 2 x (x . d - sigma eps)``, so

    G        = E g         = 2 d                              (E x x^T = I)
    E g g^T  = 4 (E[x x^T (x . d)^2] + sigma^2 I) = 4 ((|d|^2 + sigma^2) I + 2 d d^T)
               (Isserlis: E[x_i x_j x_k x_l] d_k d_l = |d|^2 delta_ij + 2 d_i d_j)
    Sigma    = E g g^T - G G^T = 4 ((|d|^2 + sigma^2) I + d d^T)
    tr Sigma = 4 (D (|d|^2 + sigma^2) + |d|^2),   |G|^2 = 4 |d|^2

and ``B_simple = (D (|d|^2 + sigma^2) + |d|^2) / |d|^2``: 21 for D = 10, |d| = 1, sigma = 1.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from nbbatch import Trainer, data
from nbbatch.diagnostics import (fit_critical_batch, gradient_noise_scale, lr_find, noise_scale_two_batch, smoothed_noise_scale,
                                 sweep)
from nbbatch.noise import NoiseScaleEMA, OnlineNoiseScale, squared_grad_norm, two_batch_estimate
from helpers import make_mlp, same_weights

D, SIGMA = 10, 1.0
B_SIMPLE = (D * (1 + SIGMA ** 2) + 1) / 1          # 21
TRACE, GRAD_SQ = 4 * (D * (1 + SIGMA ** 2) + 1), 4.0


def regression(n=8192, seed=0):
    d = data.linear_regression(n_train=n, n_test=16, dim=D, noise=SIGMA, seed=seed)
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(D, generator=g)
    delta /= delta.norm()                              # |d| = 1
    model = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((d.info["w_true"] + delta)[None])
    return model, d


# ---------------------------------------------------------------------- exact (per-example gradients)
def test_exact_noise_scale_matches_the_closed_form():
    model, d = regression()
    ns = gradient_noise_scale(model, d, loss="mse")
    assert ns.examples == 8192
    assert ns.b_simple == pytest.approx(B_SIMPLE, rel=0.10)
    assert ns.trace == pytest.approx(TRACE, rel=0.10)
    assert ns.grad_sq == pytest.approx(GRAD_SQ, rel=0.10)


def test_exact_noise_scale_equals_a_direct_computation_on_an_mlp(toy):
    # tr(Sigma) and |G|^2 of the data set itself, from gradients computed one example at a time.
    x, y = toy
    model = make_mlp()
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    g = torch.stack(grads)
    mean = g.mean(0)
    trace = ((g - mean) ** 2).sum(1).mean().item()
    ns = gradient_noise_scale(model, (x, y), chunk_size=64)
    assert ns.trace == pytest.approx(trace, rel=1e-5)
    assert ns.grad_sq == pytest.approx((mean ** 2).sum().item(), rel=1e-5)
    assert ns.b_simple == pytest.approx(trace / (mean ** 2).sum().item(), rel=1e-5)
    # a sample gives unbiased estimates of the same quantities (close, not equal)
    sampled = gradient_noise_scale(model, (x, y), sample=150, seed=3)
    assert sampled.examples == 150
    assert sampled.trace == pytest.approx(trace, rel=0.25)


def test_sampled_noise_scale_is_unbiased_for_the_data_set(monkeypatch):
    # every subset of n = 3 of N = 6 examples in turn (the draws of randperm): the mean of the
    # sampled estimates over all of them is the exact value of the data set
    import itertools
    torch.manual_seed(0)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    model = make_mlp()
    exact = gradient_noise_scale(model, (x, y))
    assert gradient_noise_scale(model, (x, y), sample=6) == exact
    subsets = list(itertools.combinations(range(6), 3))
    draws = iter(subsets)
    real_randperm = torch.randperm

    def randperm(n, **kwargs):
        chosen = list(next(draws))
        return torch.tensor(chosen + [i for i in range(n) if i not in chosen])

    monkeypatch.setattr(torch, "randperm", randperm)
    estimates = [gradient_noise_scale(model, (x, y), sample=3) for _ in subsets]
    monkeypatch.setattr(torch, "randperm", real_randperm)
    assert sum(e.trace for e in estimates) / len(subsets) == pytest.approx(exact.trace, rel=1e-6)   # float32 gradients
    assert sum(e.grad_sq for e in estimates) / len(subsets) == pytest.approx(exact.grad_sq, rel=1e-6)


def test_exact_noise_scale_leaves_the_model_alone():
    model = make_mlp(dropout=0.5)
    model.train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(40, 8)
    y = torch.randint(0, 3, (40,))
    gradient_noise_scale(model, (x, y))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_exact_noise_scale_rejects_bad_input():
    model = make_mlp()
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="sample=11"):
        gradient_noise_scale(model, (x, y), sample=11)
    with pytest.raises(ValueError, match="sample=1 "):
        gradient_noise_scale(model, (x, y), sample=1)
    with pytest.raises(ValueError, match="chunk_size"):
        gradient_noise_scale(model, (x, y), chunk_size=0)
    with pytest.raises(ValueError, match="loss='hinge'"):
        gradient_noise_scale(model, (x, y), loss="hinge")
    with pytest.raises(ValueError, match="4 labels"):
        gradient_noise_scale(model, (x, y[:4]))
    with pytest.raises(TypeError, match="data must be"):
        gradient_noise_scale(model, [1, 2, 3])
    with pytest.raises(TypeError, match="model must be"):
        gradient_noise_scale("model", (x, y))


# ---------------------------------------------------------------------- two-batch estimator
def test_two_batch_estimate_inverts_the_expected_norms():
    # E|g_B|^2 = |G|^2 + tr(Sigma)/B exactly -> the estimator returns |G|^2 and tr(Sigma) exactly
    for b_small, b_big in ((1, 2), (3, 100), (32, 4096)):
        g2, tr = two_batch_estimate(GRAD_SQ + TRACE / b_small, GRAD_SQ + TRACE / b_big, b_small, b_big)
        assert g2 == pytest.approx(GRAD_SQ) and tr == pytest.approx(TRACE)
    # elementwise on tensors
    g2, tr = two_batch_estimate(torch.tensor([2.0, 6.0]), torch.tensor([1.5, 1.3125]), 4, 64)
    assert tr[1].item() == pytest.approx(20.0) and g2[1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("b_small, b_big, match", [
    (8, 8, "equal"), (64, 8, "larger than b_big"), (0, 8, "b_small must be a positive int"),
    (2, 2.5, "b_big must be a positive int"), (True, 8, "b_small"),
])
def test_two_batch_estimate_rejects_bad_batch_sizes(b_small, b_big, match):
    with pytest.raises(ValueError, match=match):
        two_batch_estimate(1.0, 1.0, b_small, b_big)


def test_two_batch_noise_scale_matches_the_closed_form():
    model, d = regression()
    est = noise_scale_two_batch(model, d, 8, 256, draws=2000, loss="mse")
    assert est.b_simple == pytest.approx(B_SIMPLE, rel=0.10)
    assert est.trace == pytest.approx(TRACE, rel=0.10)
    assert est.grad_sq == pytest.approx(GRAD_SQ, rel=0.10)
    smoothed = noise_scale_two_batch(model, d, 8, 256, draws=2000, loss="mse", smoothing=0.995, seed=1)
    assert smoothed.b_simple == pytest.approx(B_SIMPLE, rel=0.10)


def test_two_batch_noise_scale_rejects_bad_input_and_keeps_grads():
    model, d = regression(n=512)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    with pytest.raises(ValueError, match="b_big=1024 is larger than the data"):
        noise_scale_two_batch(model, d, 8, 1024, loss="mse")
    with pytest.raises(ValueError, match="equal"):
        noise_scale_two_batch(model, d, 8, 8, loss="mse")
    with pytest.raises(ValueError, match="pass the smaller batch size first"):
        noise_scale_two_batch(model, d, 64, 8, loss="mse")
    with pytest.raises(ValueError, match="draws"):
        noise_scale_two_batch(model, d, 8, 64, draws=0, loss="mse")
    with pytest.raises(ValueError, match="smoothing"):
        noise_scale_two_batch(model, d, 8, 64, smoothing=1.0, loss="mse")
    noise_scale_two_batch(model, d, 8, 64, draws=3, loss="mse")
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_two_batch_noise_scale_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    x, y = torch.randn(256, 4), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))   # training mode
    before = copy.deepcopy(model.state_dict())
    est = noise_scale_two_batch(model, (x, y), 4, 64, draws=5)
    assert math.isfinite(est.trace)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ema_smooths_numerator_and_denominator_separately():
    ema = NoiseScaleEMA(0.5)
    assert math.isnan(ema.b_simple)
    ema.update(1.0, 10.0)
    assert ema.b_simple == pytest.approx(10.0)          # bias-corrected: no pull towards 0
    ema.update(-1.0, 30.0)
    # averages: g = (0.25*1 + 0.5*-1)/0.75 < 0 -> inf; the ratio of averages, not an average of ratios
    assert ema.grad_sq == pytest.approx((0.25 - 0.5) / 0.75)
    assert ema.b_simple == math.inf
    ema.update(5.0, 30.0)
    g = (0.5 * (0.25 - 0.5) + 0.5 * 5.0) / 0.875
    t = (0.5 * (0.25 * 10 + 0.5 * 30) + 0.5 * 30) / 0.875
    assert ema.b_simple == pytest.approx(t / g)
    with pytest.raises(ValueError, match="smoothing"):
        NoiseScaleEMA(-0.1)


def test_squared_grad_norm():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0, 4.0])
    assert squared_grad_norm([a, b]).item() == pytest.approx(25.0)
    assert squared_grad_norm([torch.zeros(1, requires_grad=True)]).item() == 0.0


# ---------------------------------------------------------------------- online, in the Trainer
@pytest.mark.parametrize("accumulate", [1, 8])
def test_online_noise_scale_matches_the_closed_form(accumulate):
    model, d = regression()
    # lr=0: the weights stay at w_true + d, so every recorded estimate measures the same B_simple
    t = Trainer(model, d, batch_size=256, lr=0.0, optimizer="sgd", loss="mse", accumulate=accumulate,
                noise_scale_every=1, noise_scale_smoothing=0.995, device="cpu")
    t.fit(steps=1500)
    steps = t.history.steps
    g2 = [v for v in steps["noise_grad_sq"] if v is not None]
    tr = [v for v in steps["noise_trace"] if v is not None]
    assert len(g2) == 1500
    assert sum(tr) / len(tr) == pytest.approx(TRACE, rel=0.10)
    assert sum(g2) / len(g2) == pytest.approx(GRAD_SQ, rel=0.10)
    assert steps["b_simple"][-1] == pytest.approx(B_SIMPLE, rel=0.10)


def test_online_noise_scale_every_n_steps_and_same_updates():
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    plain = Trainer(make_mlp(), (x, y), batch_size=32, lr=0.1, device="cpu")
    noisy = Trainer(make_mlp(), (x, y), batch_size=32, lr=0.1, device="cpu", noise_scale_every=3)
    plain.fit(steps=12)
    noisy.fit(steps=12)
    recorded = noisy.history.steps["b_simple"]
    assert [v is not None for v in recorded] == [s % 3 == 0 for s in range(12)]
    assert "b_simple" not in plain.history.steps
    # two half-batches give the update of the whole batch (up to float rounding)
    for p, q in zip(plain.model.parameters(), noisy.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    steps, values = smoothed_noise_scale(noisy.history, 0.9)
    assert steps == [1, 4, 7, 10] and values[-1] == pytest.approx(recorded[9])


def test_online_noise_scale_leaves_accumulated_training_bitwise_unchanged():
    # with micro-batches the estimate only reads gradient norms: the run is bitwise the same
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    plain = Trainer(make_mlp(), (x, y), batch_size=64, accumulate=4, lr=0.1, optimizer="momentum", device="cpu")
    noisy = Trainer(make_mlp(), (x, y), batch_size=64, accumulate=4, lr=0.1, optimizer="momentum", device="cpu",
                    noise_scale_every=1)
    plain.fit(steps=12)
    noisy.fit(steps=12)
    assert same_weights(plain.model, noisy.model)
    assert plain.history.steps["loss"] == noisy.history.steps["loss"]
    assert all(v is not None for v in noisy.history.steps["noise_trace"])


def test_online_noise_scale_resumes_exactly(tmp_path):
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    full = Trainer(make_mlp(), (x, y), batch_size=32, lr=0.1, device="cpu", noise_scale_every=2)
    full.fit(steps=10)
    half = Trainer(make_mlp(), (x, y), batch_size=32, lr=0.1, device="cpu", noise_scale_every=2)
    half.fit(steps=5)
    half.save(tmp_path / "ck.pt")
    resumed = Trainer.load(tmp_path / "ck.pt", make_mlp(), (x, y))
    resumed.fit(steps=5)
    assert resumed.history.steps["b_simple"] == full.history.steps["b_simple"]
    assert same_weights(resumed.model, full.model)


def test_online_noise_scale_options_are_checked():
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="noise_scale_every must be a positive int, got 0"):
        Trainer(make_mlp(), (x, y), batch_size=8, noise_scale_every=0)
    with pytest.raises(ValueError, match="noise_scale_smoothing"):
        Trainer(make_mlp(), (x, y), batch_size=8, noise_scale_every=1, noise_scale_smoothing=1.0)
    with pytest.raises(ValueError, match="no noise-scale columns"):
        smoothed_noise_scale(Trainer(make_mlp(), (x, y), batch_size=8).history)
    online = OnlineNoiseScale(2)
    assert online.due(0) and not online.due(1)


# ---------------------------------------------------------------------- critical batch fit
def test_fit_recovers_s_min_and_e_min_exactly():
    bs = [8, 32, 128, 512, 2048]
    fit = fit_critical_batch(bs, [40 + 12000 / b for b in bs])
    assert fit.s_min == pytest.approx(40) and fit.e_min == pytest.approx(12000)
    assert fit.b_crit == pytest.approx(300)
    # at B_crit a run costs 2 S_min steps and 2 E_min examples
    assert fit.predict_steps(fit.b_crit) == pytest.approx(2 * fit.s_min)
    assert fit.predict_examples(fit.b_crit) == pytest.approx(2 * fit.e_min)
    assert [fit.regime(b) for b in (50, 300, 1000)] == ["perfect scaling", "diminishing returns",
                                                         "maximal data parallelism"]


def test_fit_uses_relative_error_and_stays_non_negative():
    # perfect scaling everywhere: S_min is 0 and B_crit infinite
    fit = fit_critical_batch([16, 64, 256], [1000, 250, 62.5])
    assert fit.s_min == pytest.approx(0, abs=1e-9) and fit.e_min == pytest.approx(16000)
    assert fit.b_crit == math.inf
    # no gain from larger batches: E_min is 0
    fit = fit_critical_batch([16, 64, 256], [50, 50, 50])
    assert fit.e_min == pytest.approx(0, abs=1e-9) and fit.s_min == pytest.approx(50)
    # a 10% error on the smallest point moves the fit much less than on an absolute scale
    bs = [16, 64, 256, 1024]
    noisy = [(40 + 12000 / b) * f for b, f in zip(bs, (1.1, 1.0, 1.0, 1.0))]
    assert fit_critical_batch(bs, noisy).s_min == pytest.approx(40, rel=0.15)


@pytest.mark.parametrize("bs, steps, match", [
    ([16, 64], [10], "same length"), ([16, 16], [10, 12], "two different"), ([16, 64], [10, 0], "> 0"),
    ([16, 64], [10, math.nan], "> 0"),
])
def test_fit_rejects_bad_input(bs, steps, match):
    with pytest.raises(ValueError, match=match):
        fit_critical_batch(bs, steps)


# ---------------------------------------------------------------------- sweep
@pytest.fixture(scope="module")
def teacher():
    return data.teacher_student(n_train=1024, n_test=64, dim=8, num_classes=3, seed=0)


def small_model():
    return make_mlp(d_in=8, d_out=3, hidden=16)


def test_sweep_measures_steps_to_target_per_batch_size(teacher):
    res = sweep(small_model, teacher, [64, 16, 256], target=0.15, lrs=[0.1, 0.3], optimizer="momentum",
                max_steps=500, noise_scale=True)
    assert [r["batch_size"] for r in res.best] == [16, 64, 256]
    assert len(res.runs) == 6
    for row in res.best:
        mine = [r for r in res.runs if r["batch_size"] == row["batch_size"] and r["reached"]]
        assert row["reached"] and row["steps"] == min(r["steps"] for r in mine)
        assert row["examples"] == row["steps"] * row["batch_size"]     # 1024 divides by every batch size
        assert row["b_simple"] > 0
    for run in res.runs:
        if run["reached"]:
            # the target was first met at the recorded step: earlier checks are above it, that one below
            steps, values = zip(*run["curve"])
            assert steps[-1] == run["steps"] and values[-1] <= 0.15 and all(v > 0.15 for v in values[:-1])
    # more examples per step: fewer steps to the same loss
    assert res.best[0]["steps"] > res.best[1]["steps"] > res.best[2]["steps"]
    assert res.fit is not None and res.b_crit > 0 and res.b_simple > 0
    fig = res.plot()
    assert len(fig.axes) == 2
    assert list(res.table().index) == [16, 64, 256]


def test_sweep_checks_the_target_where_it_says(teacher):
    # an independent run of the chosen lr: the full-training-set loss at the reported step meets the
    # target, and the previous check did not
    res = sweep(small_model, teacher, [32], target=0.8, lrs=[0.2], optimizer="momentum", max_steps=300,
                noise_scale=False)
    run = res.runs[0]
    torch.manual_seed(0)
    t = Trainer(small_model(), (teacher.x_train, teacher.y_train), batch_size=32, lr=0.2, optimizer="momentum", seed=0)
    prev = run["curve"][-2][0]
    t.fit(steps=prev)
    assert t.evaluate("train")["loss"] > 0.8
    t.fit(steps=run["steps"] - prev)
    assert t.evaluate("train")["loss"] == pytest.approx(run["curve"][-1][1], abs=1e-6)


def test_sweep_reports_an_unreachable_target_with_the_best_value(teacher):
    res = sweep(small_model, teacher, [64, 128], target=0.0001, lrs=[0.05, 0.2], optimizer="momentum",
                max_steps=20, noise_scale=False)
    assert all(not r["reached"] and r["steps"] is None for r in res.best)
    for row in res.best:
        mine = [r for r in res.runs if r["batch_size"] == row["batch_size"]]
        assert row["best"] == min(r["best"] for r in mine)
        assert all(r["best"] == min(v for _, v in r["curve"]) for r in mine)
    assert res.fit is None and res.b_crit is None and res.b_simple is None
    res.plot()
    # an example budget caps the steps per batch size
    res = sweep(small_model, teacher, [16, 64], target=0.0001, lrs=[0.1], max_steps=100, max_examples=1600,
                noise_scale=False)
    assert [r["budget"] for r in res.best] == [100, 25]
    assert [r["curve"][-1][0] for r in res.runs] == [100, 25]


def test_sweep_with_a_scaling_rule_and_a_diverging_lr(teacher):
    from nbbatch import models

    res = sweep(lambda: models.MLP(8, (16,), 3), teacher, [16, 64], target=("accuracy", 0.7), lr=0.1,
                scale_rule="linear", lr_factors=(1.0, 1e30), optimizer="sgd", max_steps=200, noise_scale=False)
    assert [r["lr"] for r in res.runs] == pytest.approx([0.1, 1e29, 0.4, 4e29])
    assert [r["diverged"] for r in res.runs] == [False, True, False, True]
    assert all(r["lr"] in (0.1, 0.4) for r in res.best) and all(r["diverged_lrs"] == 1 for r in res.best)
    assert res.target.mode == "max"


def test_sweep_measures_the_noise_scale_with_the_loss_of_a_config():
    from nbbatch import TrainConfig
    d = data.linear_regression(n_train=256, n_test=16, dim=4, noise=0.1, seed=0)
    common = dict(target=0.5, lrs=[0.05], max_steps=200)
    by_option = sweep(lambda: nn.Linear(4, 1), d, [16, 64], loss="mse", **common)
    by_config = sweep(lambda: nn.Linear(4, 1), d, [16, 64], config=TrainConfig(loss="mse"), **common)
    assert all(r["reached"] and r["b_simple"] > 0 for r in by_option.best)
    assert [(r["steps"], r["b_simple"]) for r in by_config.best] == [(r["steps"], r["b_simple"]) for r in by_option.best]


def test_sweep_rejects_bad_input(teacher):
    ok = dict(target=0.5, lrs=[0.1])
    with pytest.raises(ValueError, match="batch_sizes is empty"):
        sweep(small_model, teacher, [], **ok)
    with pytest.raises(ValueError, match="lrs is empty"):
        sweep(small_model, teacher, [16], target=0.5, lrs=[])
    with pytest.raises(ValueError, match="larger than the training set"):
        sweep(small_model, teacher, [16, 2048], **ok)
    with pytest.raises(ValueError, match="duplicates"):
        sweep(small_model, teacher, [16, 16], **ok)
    with pytest.raises(ValueError, match="not both"):
        sweep(small_model, teacher, [16], target=0.5, lrs=[0.1], lr=0.1)
    with pytest.raises(ValueError, match="lrs must hold finite numbers > 0"):
        sweep(small_model, teacher, [16], target=0.5, lrs=[0.1, -1])
    with pytest.raises(ValueError, match="target"):
        sweep(small_model, teacher, [16], target=None, lrs=[0.1])
    with pytest.raises(ValueError, match="not measured"):
        sweep(small_model, teacher, [16], target=("f1", 0.5), lrs=[0.1])
    with pytest.raises(ValueError, match="max_steps"):
        sweep(small_model, teacher, [16], max_steps=0, **ok)
    with pytest.raises(ValueError, match="max_examples"):
        sweep(small_model, teacher, [16], max_examples=-5, **ok)
    with pytest.raises(ValueError, match="batch_size= is set by the sweep"):
        sweep(small_model, teacher, [16], batch_size=3, **ok)
    with pytest.raises(TypeError, match="model_fn"):
        sweep(None, teacher, [16], **ok)


# ---------------------------------------------------------------------- lr_find
@pytest.mark.parametrize("optimizer, accumulate", [("momentum", 1), ("adam", 2)])
def test_lr_find_leaves_model_and_optimizer_exactly_as_they_were(teacher, optimizer, accumulate):
    def make():
        torch.manual_seed(0)
        return Trainer(small_model(), teacher, batch_size=32, lr=0.05, optimizer=optimizer,
                       accumulate=accumulate, device="cpu")

    probed, twin = make(), make()
    probed.fit(steps=5)
    twin.fit(steps=5)
    probed.model.eval()
    for p in probed.model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model_before = copy.deepcopy(probed.model.state_dict())
    opt_before = copy.deepcopy(probed.optimizer.state_dict())
    rng_before = torch.get_rng_state()
    res = lr_find(probed, start_lr=1e-3, end_lr=100.0, steps=60)
    assert not probed.model.training
    assert all(torch.equal(model_before[k], v) for k, v in probed.model.state_dict().items())
    after = probed.optimizer.state_dict()
    assert after["param_groups"] == opt_before["param_groups"]
    for i, state in opt_before["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) if torch.is_tensor(v) else v == after["state"][i][k]
                   for k, v in state.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in probed.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert probed.step_count == 5 and len(probed.history.steps) == 5
    # continuing gives bitwise the run that never saw lr_find
    probed.model.train()
    probed.fit(steps=10)
    twin.fit(steps=10)
    assert same_weights(probed.model, twin.model)
    assert probed.history.steps["loss"] == twin.history.steps["loss"]
    # and the range test itself did something sensible
    assert res.stopped_early                      # lr = 100 blows the loss up
    assert res.lrs[0] == pytest.approx(1e-3) and all(b > a for a, b in zip(res.lrs, res.lrs[1:]))
    assert 1e-4 < res.suggested_lr < 10
    res.plot()


def test_lr_find_scales_the_loss_when_the_trainer_has_a_grad_scaler(teacher):
    # fp16 (CUDA) trainers carry a GradScaler; a CPU scaler stands in for it here. Scaling by a
    # power of two is exact, so the range test must give the plain one's losses, with every
    # backward on a scaled loss (unscaled fp16 gradients underflow) and the scaler put back.
    def make():
        torch.manual_seed(0)
        return Trainer(small_model(), teacher, batch_size=32, lr=0.05, optimizer="momentum", accumulate=2,
                       device="cpu")

    plain = lr_find(make(), start_lr=1e-3, end_lr=1.0, steps=20)
    t = make()
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaled_losses = []
    real_scale = t.scaler.scale

    def scale(loss):
        scaled_losses.append(loss)
        return real_scale(loss)

    t.scaler.scale = scale
    before = copy.deepcopy(t.scaler.state_dict())
    res = lr_find(t, start_lr=1e-3, end_lr=1.0, steps=20)
    assert len(scaled_losses) == 2 * len(res.lrs)
    assert res.losses == plain.losses and res.lrs == plain.lrs
    assert t.scaler.state_dict() == before


def test_lr_find_clips_gradients_as_the_trainer_does(teacher):
    def make():
        torch.manual_seed(0)
        return Trainer(small_model(), teacher, batch_size=32, lr=0.05, optimizer="momentum", clip_grad_norm=0.05,
                       device="cpu")

    res = lr_find(make(), start_lr=1e-3, end_lr=10.0, steps=15)
    # the same range test by hand, with the trainer's clipping
    t = make()
    ratio = (10.0 / 1e-3) ** (1 / 14)
    losses = []
    for i, (xb, yb) in zip(range(15), t._train.batches(0, 0)):
        for group in t.optimizer.param_groups:
            group["lr"] = 1e-3 * ratio ** i
        t.optimizer.zero_grad(set_to_none=True)
        loss = t.loss_fn(t.model(xb), yb) * 1.0
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), 0.05)
        t.optimizer.step()
    assert res.losses == losses


def test_lr_find_rejects_bad_input(teacher):
    t = Trainer(small_model(), teacher, batch_size=32)
    for kwargs, match in (({"start_lr": 0}, "start_lr"), ({"start_lr": 1.0, "end_lr": 0.5}, "end_lr=0.5"),
                          ({"steps": 1}, "steps"), ({"smoothing": 1.0}, "smoothing"), ({"diverge": 1.0}, "diverge")):
        with pytest.raises(ValueError, match=match):
            lr_find(t, **kwargs)
    with pytest.raises(TypeError, match="Trainer"):
        lr_find(small_model())


def test_sweep_measures_the_target_on_the_data_it_is_given(teacher):
    common = dict(target=0.6, lrs=[0.3], optimizer="momentum", max_steps=60, noise_scale=False)
    on_test = sweep(small_model, teacher, [64], eval_data="test", **common).runs[0]
    on_pair = sweep(small_model, teacher, [64], eval_data=(teacher.x_test, teacher.y_test), **common).runs[0]
    assert on_test["curve"] == on_pair["curve"]
    # the values are those of the test split at the recorded steps
    torch.manual_seed(0)
    t = Trainer(small_model(), (teacher.x_train, teacher.y_train), batch_size=64, lr=0.3, optimizer="momentum", seed=0)
    step, value = on_test["curve"][3]
    t.fit(steps=step)
    assert t.evaluate((teacher.x_test, teacher.y_test))["loss"] == pytest.approx(value, abs=1e-6)
    with pytest.raises(ValueError, match="eval_data='test'"):
        sweep(small_model, (teacher.x_train, teacher.y_train), [64], eval_data="test", **common)


def test_lr_find_restores_a_dataloader_run_exactly(teacher):
    from torch.utils.data import DataLoader, TensorDataset

    def make():
        torch.manual_seed(0)
        loader = DataLoader(TensorDataset(teacher.x_train, teacher.y_train), batch_size=32, shuffle=True)
        return Trainer(small_model(), loader, lr=0.05, optimizer="momentum", device="cpu")

    probed, twin = make(), make()
    torch.manual_seed(1)
    probed.fit(steps=3)
    torch.manual_seed(1)
    twin.fit(steps=3)
    rng = torch.get_rng_state()
    lr_find(probed, steps=20)   # iterates the loader (a shuffle draws from the global RNG) and trains
    assert torch.equal(torch.get_rng_state(), rng)
    probed.fit(steps=40)        # crosses an epoch boundary: the next shuffle draws from the global RNG
    torch.set_rng_state(rng)    # the twin starts its epoch from the same global state
    twin.fit(steps=40)
    assert same_weights(probed.model, twin.model)


def test_lr_finder_result_repr_is_a_summary():
    from nbbatch.diagnostics import LRFinderResult
    r = LRFinderResult([1e-4] * 99 + [10.0], [2.3] * 100, [2.3] * 100, 0.05, False)
    assert repr(r) == "LRFinderResult(steps=100, lrs=0.0001..10, suggested_lr=0.05, stopped_early=False)"


def test_lr_find_runs_the_trainers_own_step_without_its_callbacks(teacher):
    """Checkpointed forward and all: the range test is the run's step at other learning rates."""
    def make(**options):
        torch.manual_seed(0)
        return Trainer(small_model(), (teacher.x_train, teacher.y_train), batch_size=32, lr=0.05,
                       optimizer="momentum", device="cpu", **options)

    plain, checkpointed = make(), make(checkpoint_segments=2)
    calls = []
    checkpointed.add_callback("step_end", lambda t, row: calls.append(row))
    a, b = lr_find(plain, steps=15), lr_find(checkpointed, steps=15)
    assert a.lrs == b.lrs and a.losses == pytest.approx(b.losses, rel=1e-6, abs=0)
    assert calls == [] and len(checkpointed.history.steps) == 0 and checkpointed.step_count == 0
