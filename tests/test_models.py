"""Tests for nbbatch.models: shapes, hand-counted parameters, norm choice, sizing from data, errors, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from nbbatch.data import DataBundle, linear_regression, teacher_student
from nbbatch.models import CNN1d, MLP, MODELS, NORMS, make_model, make_norm


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seeded():
    # Fork so seeding here never leaks into other tests' global RNG.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


# ---------------------------------------------------------------------------
# make_norm
# ---------------------------------------------------------------------------


def test_make_norm_kinds():
    assert isinstance(make_norm("none", 7), nn.Identity)
    assert isinstance(make_norm(None, 7), nn.Identity)
    assert isinstance(make_norm("batch", 7), nn.BatchNorm1d)
    assert isinstance(make_norm("batch", 7, dims=2), nn.BatchNorm1d)
    assert isinstance(make_norm("batch", 7, dims=3), nn.BatchNorm2d)
    layer = make_norm("layer", 7)
    assert isinstance(layer, nn.LayerNorm) and layer.normalized_shape == (7,)
    conv_layer = make_norm("layer", 7, dims=2)
    assert isinstance(conv_layer, nn.GroupNorm) and conv_layer.num_groups == 1
    assert make_norm("BATCH", 4).num_features == 4  # case-insensitive


@pytest.mark.parametrize("channels, groups", [(100, 5), (25, 5), (16, 8), (7, 7), (6, 6), (9, 3), (1, 1), (64, 8)])
def test_make_norm_default_groups(channels, groups):
    norm = make_norm("group", channels)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == groups and norm.num_channels == channels


def test_make_norm_explicit_groups():
    assert make_norm("group", 12, groups=4).num_groups == 4


def test_conv_layer_norm_normalises_over_channels_and_length():
    x = torch.randn(3, 5, 11) * 4 + 2
    y = make_norm("layer", 5, dims=2)(x)
    # Fresh affine is identity: each sample has mean 0 and variance 1 over (C, L).
    assert torch.allclose(y.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-3)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (("weird", 8), {}, ValueError, r"norm must be one of \('none', 'batch', 'group', 'layer'\), got 'weird'"),
        ((3, 8), {}, ValueError, "norm"),
        (("group", 10), dict(groups=3), ValueError, "groups must divide num_features=10, got groups=3"),
        (("group", 10), dict(groups=0), ValueError, "groups"),
        (("batch", 10), dict(groups=2), ValueError, "groups is only used with norm='group'"),
        (("batch", 0), {}, ValueError, "num_features"),
        (("batch", 2.0), {}, TypeError, "num_features"),
        (("batch", 8), dict(dims=4), ValueError, "dims"),
    ],
)
def test_make_norm_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_norm(*args, **kwargs)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------

HAND_COUNT = 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10  # = 15210
NORM_PARAMS = {"none": 0, "batch": 2 * 100 * 2, "group": 2 * 100 * 2, "layer": 2 * 100 * 2}  # weight+bias per hidden layer


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_shapes_and_parameter_count(norm):
    model = MLP(40, (100, 100), 10, norm=norm)
    assert n_params(model) == HAND_COUNT + NORM_PARAMS[norm]
    model.train()
    assert model(torch.randn(32, 40)).shape == (32, 10)
    model.eval()
    assert model(torch.randn(1, 40)).shape == (1, 10)


def test_mlp_layout_and_flatten():
    model = MLP(in_features=12, hidden=(8,), num_classes=3, norm="batch", activation="tanh", dropout=0.25)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.Tanh, nn.Dropout, nn.Linear]
    assert model(torch.randn(5, 3, 4)).shape == (5, 3)  # (N, ...) inputs are flattened
    assert isinstance(model[:-1], nn.Sequential) and model[:-1](torch.randn(2, 12)).shape == (2, 8)
    linear = MLP(5, (), 2)
    assert [type(m) for m in linear] == [nn.Flatten, nn.Linear] and n_params(linear) == 12
    assert isinstance(MLP()[2], nn.Identity)  # norm slot kept for norm="none"


def test_mlp_checkpoint_sequential_matches_plain_forward():
    model = MLP(40, (32, 32, 32), 10)
    x = torch.randn(8, 40)
    plain = model(x)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ckpt = checkpoint_sequential(model, 3, x.requires_grad_(), use_reentrant=False)
    ckpt.sum().backward()
    assert torch.allclose(plain, ckpt)
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_features=0), ValueError, "in_features"),
        (dict(in_features=4.0), TypeError, "in_features"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(hidden=(100, 0)), ValueError, r"hidden .*entry 1 is 0"),
        (dict(hidden=100), TypeError, "hidden"),
        (dict(hidden="100"), TypeError, "hidden"),
        (dict(hidden=(10.5,)), ValueError, "hidden"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(activation="swish2"), ValueError, "activation"),
        (dict(norm="instance"), ValueError, "norm"),
    ],
)
def test_mlp_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MLP(**kwargs)


# ---------------------------------------------------------------------------
# CNN1d
# ---------------------------------------------------------------------------

CNN_HAND_COUNT = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (25 * 5 * 10 + 10)  # = 5210


@pytest.mark.parametrize("norm", NORMS)
def test_cnn_shapes_and_parameter_count(norm):
    model = CNN1d(norm=norm)
    assert model.out_length == 5 and model[-1].in_features == 125  # 40 -> 19 -> 10 -> 5
    assert n_params(model) == CNN_HAND_COUNT + (0 if norm == "none" else 3 * 2 * 25)
    assert model(torch.randn(16, 40)).shape == (16, 10)
    assert model(torch.randn(16, 1, 40)).shape == (16, 10)
    model.eval()
    assert model(torch.randn(1, 40)).shape == (1, 10)


def test_cnn_other_sizes_and_bad_input():
    model = CNN1d(in_length=64, channels=(8, 16), num_classes=4, norm="group")
    # 64 -> (64 + 2 - 5) // 2 + 1 = 31 -> (31 + 2 - 3) // 2 + 1 = 16
    assert model.out_length == 16 and model[-1].in_features == 16 * 16
    assert model(torch.randn(3, 64)).shape == (3, 4)
    assert isinstance(model[2], nn.GroupNorm) and model[2].num_groups == 8
    with pytest.raises(ValueError, match=r"\(N, L\) or \(N, 1, L\)"):
        model(torch.randn(3, 2, 64))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_length=2), ValueError, "in_length=2 is too short"),
        (dict(in_length=0), ValueError, "in_length"),
        (dict(channels=()), ValueError, "channels"),
        (dict(channels=(25, -1)), ValueError, "channels"),
        (dict(num_classes=True), TypeError, "num_classes"),
        (dict(norm="batchnorm"), ValueError, "norm"),
    ],
)
def test_cnn_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CNN1d(**kwargs)


# ---------------------------------------------------------------------------
# make_model
# ---------------------------------------------------------------------------


def test_make_model_infers_sizes_from_data():
    data = teacher_student(n_train=64, n_test=16, dim=12, num_classes=4)
    mlp = make_model("mlp", data, hidden=(16,), norm="layer")
    assert isinstance(mlp, MLP) and mlp.in_features == 12 and mlp.num_classes == 4 and mlp.norm == "layer"
    assert mlp(data.x_train).shape == (64, 4)
    cnn = make_model("CNN", data, channels=(4, 4))
    assert isinstance(cnn, CNN1d) and cnn.in_length == 12 and cnn(data.x_test).shape == (16, 4)
    assert make_model("mlp", data, num_classes=7).num_classes == 7  # explicit wins
    assert make_model("mlp").in_features == 40  # no data: class defaults


def test_make_model_regression_and_shaped_inputs():
    reg = linear_regression(n_train=32, n_test=8, dim=5)
    assert make_model("mlp", reg, hidden=()).num_classes == 1
    multi = DataBundle(torch.randn(6, 2, 3), torch.randn(6, 4), torch.randn(2, 2, 3), torch.randn(2, 4),
                       None, "multi", {"name": "multi", "kwargs": {}})
    mlp = make_model("mlp", multi)
    assert (mlp.in_features, mlp.num_classes) == (6, 4)
    with pytest.raises(ValueError, match=r"cnn needs 1-D inputs.*\(2, 3\)"):
        make_model("cnn", multi)
    chan = DataBundle(torch.randn(6, 1, 20), torch.zeros(6, dtype=torch.long), torch.randn(2, 1, 20),
                      torch.zeros(2, dtype=torch.long), 3, "chan", {"name": "chan", "kwargs": {}})
    assert make_model("cnn", chan).in_length == 20


def test_make_model_errors():
    with pytest.raises(ValueError, match="unknown model name 'resnet'; known names: mlp, cnn"):
        make_model("resnet")
    with pytest.raises(TypeError, match="name"):
        make_model(None)
    with pytest.raises(TypeError, match="data"):
        make_model("mlp", data=[1, 2, 3])
    with pytest.raises(ValueError, match="norm"):
        make_model("mlp", norm="bn")
    assert MODELS == ("mlp", "cnn")


# ---------------------------------------------------------------------------
# Real behaviour: the models learn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_sgd_reduces_loss_on_teacher_student(norm):
    data = teacher_student(n_train=512, n_test=128, dim=10, num_classes=4, hidden=16, seed=3)
    model = make_model("mlp", data, hidden=(64,), norm=norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.train()
    losses = []
    for step in range(60):
        idx = torch.arange(step * 64, (step + 1) * 64) % data.n_train
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(x), y).item()
        test_acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert losses[0] > 1.2  # about log(4) = 1.39 at init
    assert train_loss < 0.3 * losses[0]
    assert test_acc > 0.75  # chance is about 0.25; reached about 0.87-0.91


def test_cnn_adam_reduces_loss():
    data = teacher_student(n_train=256, n_test=64, dim=40, num_classes=3, hidden=16, seed=1)
    model = make_model("cnn", data, norm="batch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.train()
    with torch.no_grad():
        start = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * start
