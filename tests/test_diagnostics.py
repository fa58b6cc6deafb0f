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
from nbbatch.diagnostics import (NoiseScaleEMA, OnlineNoiseScale, gradient_noise_scale, noise_scale_two_batch,
                                 smoothed_noise_scale, squared_grad_norm, two_batch_estimate)
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
