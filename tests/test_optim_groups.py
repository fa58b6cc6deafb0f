"""LARS and LAMB chosen by name: 1-D parameters (biases, norm weights) are left out of the trust
ratio and of weight decay by default; ``adapt_all=True`` adapts everything; LAMB's eps.

Every update is checked against the papers' formulas written out here by hand (float64).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from nbbatch import Trainer, TrainConfig
from nbbatch.optim import LAMB, LAMB_EPS, LARS, layerwise_groups


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():                       # norm parameters away from their 1 / 0 initial values
        model[1].weight.add_(0.3 * torch.randn(4, dtype=torch.float64))
        model[1].bias.add_(0.2 * torch.randn(4, dtype=torch.float64))
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    return model, x, y


def grads_of(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def lars_by_hand(w, g, lr, wd, eta, adapted):
    """One LARS step without momentum (You et al. 2017, Algorithm 1)."""
    if not adapted:
        return w - lr * g                                       # no trust ratio, no weight decay
    ratio = eta * w.norm() / (g.norm() + wd * w.norm()) if w.norm() > 0 and g.norm() > 0 else 1.0
    return w - lr * ratio * (g + wd * w)


def lamb_first_step_by_hand(w, g, lr, wd, eps, adapted):
    """LAMB's first step (t = 1, bias-corrected: m = g, v = g^2), You et al. 2019, Algorithm 2."""
    r = g / (g.abs() + eps)
    if not adapted:
        return w - lr * r                                       # a plain Adam step, no weight decay
    u = r + wd * w
    ratio = w.norm() / u.norm() if w.norm() > 0 and u.norm() > 0 else 1.0
    return w - lr * ratio * u


def one_trainer_step(model, x, y, **options):
    t = Trainer(model, (x, y), batch_size=len(x), seed=0, device="cpu", **options)
    t.step()
    return t


@pytest.mark.parametrize("adapt_all", [False, True])
def test_lars_by_name_against_hand_computed_updates(adapt_all):
    model, x, y = model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    grads = grads_of(copy.deepcopy(model), x, y)
    t = one_trainer_step(model, x, y, optimizer="lars", lr=2.0, momentum=0.0, weight_decay=0.01,
                         adapt_all=adapt_all)
    for w0, g, w1 in zip(before, grads, model.parameters()):
        expected = lars_by_hand(w0, g, 2.0, 0.01, 0.001, adapted=adapt_all or w0.dim() >= 2)
        torch.testing.assert_close(w1.detach(), expected, rtol=1e-10, atol=1e-12)
    names = [g["name"] for g in t.optimizer.param_groups]
    assert names == (["adapted"] if adapt_all else ["adapted", "1-d"])


@pytest.mark.parametrize("adapt_all", [False, True])
def test_lamb_by_name_against_hand_computed_updates(adapt_all):
    model, x, y = model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    grads = grads_of(copy.deepcopy(model), x, y)
    one_trainer_step(model, x, y, optimizer="lamb", lr=0.01, weight_decay=0.1, adapt_all=adapt_all)
    for w0, g, w1 in zip(before, grads, model.parameters()):
        expected = lamb_first_step_by_hand(w0, g, 0.01, 0.1, LAMB_EPS, adapted=adapt_all or w0.dim() >= 2)
        torch.testing.assert_close(w1.detach(), expected, rtol=1e-10, atol=1e-12)


def test_the_default_groups_are_visible_and_split_by_dimension():
    model, x, y = model_and_data()
    t = Trainer(model, (x, y), batch_size=8, optimizer="lamb", lr=0.01, weight_decay=0.1, device="cpu")
    adapted, one_d = t.optimizer.param_groups
    assert (adapted["name"], adapted["adapt"], adapted["weight_decay"]) == ("adapted", True, 0.1)
    assert (one_d["name"], one_d["adapt"], one_d["weight_decay"]) == ("1-d", False, 0.0)
    ids = lambda ps: {id(p) for p in ps}   # noqa: E731
    assert ids(adapted["params"]) == ids([model[0].weight, model[3].weight])
    assert ids(one_d["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model[3].bias])
    assert t.optimizer.param_groups[0]["eps"] == LAMB_EPS == 1e-6


def test_a_model_without_1d_parameters_has_one_group():
    groups = layerwise_groups(nn.Linear(3, 2, bias=False).parameters(), 0.1)
    assert [g["name"] for g in groups] == ["adapted"]
    assert layerwise_groups([nn.Parameter(torch.zeros(3))], 0.1)[0]["name"] == "1-d"


def test_several_lars_steps_with_momentum_by_hand():
    # momentum buffers of both groups: v = m v + lr * ratio * (g + wd w) (ratio 1, wd 0 for 1-D)
    model, x, y = model_and_data()
    ref = copy.deepcopy(model)
    t = Trainer(model, (x, y), batch_size=16, optimizer="lars", lr=1.5, momentum=0.9, weight_decay=0.01,
                seed=0, device="cpu")
    bufs = [torch.zeros_like(p) for p in ref.parameters()]
    for _ in range(3):
        t.step()
        grads = grads_of(ref, x, y)
        with torch.no_grad():
            for p, g, v in zip(ref.parameters(), grads, bufs):
                if p.dim() >= 2:
                    step = 1.5 * 0.001 * p.norm() / (g.norm() + 0.01 * p.norm()) * (g + 0.01 * p)
                else:
                    step = 1.5 * g
                v.mul_(0.9).add_(step)
                p.sub_(v)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_eps_defaults_per_optimizer_and_a_given_eps_is_used():
    model, x, y = model_and_data()
    for name, eps in (("adam", 1e-8), ("adamw", 1e-8), ("lamb", 1e-6)):
        t = Trainer(copy.deepcopy(model), (x, y), batch_size=8, optimizer=name, lr=1e-3, device="cpu")
        assert {g["eps"] for g in t.optimizer.param_groups} == {eps}
    t = Trainer(copy.deepcopy(model), (x, y), batch_size=8, optimizer="lamb", lr=1e-3, eps=1e-8, device="cpu")
    assert {g["eps"] for g in t.optimizer.param_groups} == {1e-8}
    assert LAMB([nn.Parameter(torch.ones(2))]).defaults["eps"] == 1e-6


def test_options_are_checked():
    with pytest.raises(TypeError, match="adapt_all must be True or False, got 1"):
        TrainConfig(optimizer="lars", adapt_all=1)
    with pytest.raises(ValueError, match="adapt_all=True applies to optimizer='lars' or 'lamb'.*'adam'"):
        TrainConfig(optimizer="adam", adapt_all=True)
    for bad in (0.0, -1e-8, math.inf, "1e-6", True):
        with pytest.raises(ValueError, match="eps must be a finite number > 0 or None"):
            TrainConfig(optimizer="lamb", eps=bad)
    with pytest.raises(ValueError, match="weight_decay"):
        layerwise_groups([nn.Parameter(torch.ones(2))], -1.0)
    with pytest.raises(TypeError, match="adapt_all"):
        layerwise_groups([nn.Parameter(torch.ones(2))], 0.0, adapt_all="yes")
    assert TrainConfig(optimizer="lamb", adapt_all=True).adapt_all


def test_resume_keeps_the_groups(tmp_path):
    model, x, y = model_and_data()
    full = Trainer(copy.deepcopy(model), (x, y), batch_size=8, optimizer="lamb", lr=0.01, weight_decay=0.1, seed=1)
    full.fit(steps=6)
    first = Trainer(copy.deepcopy(model), (x, y), batch_size=8, optimizer="lamb", lr=0.01, weight_decay=0.1, seed=1)
    first.fit(steps=3)
    first.save(tmp_path / "ck.pt")
    resumed = Trainer.load(tmp_path / "ck.pt", copy.deepcopy(model), (x, y))
    resumed.fit(steps=3)
    assert [g["name"] for g in resumed.optimizer.param_groups] == ["adapted", "1-d"]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
