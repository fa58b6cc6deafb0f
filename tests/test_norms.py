"""Tests for nbbatch.norms against references: k separate BatchNorm calls, closed-form statistics,
models built with the target norm, and the Trainer's one-batch update."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import requires_cuda
from nbbatch import Trainer
from nbbatch.data import DataBundle
from nbbatch.models import CNN1d, MLP, make_norm
from nbbatch.norms import (
    BatchNormAccumulationWarning,
    BNStatsRecorder,
    CONVERT_TARGETS,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    batch_stat_noise,
    batch_stats,
    bn_layers,
    check_bn,
    convert_norm,
    norm_layers,
    precise_bn,
    warn_accumulation_with_bn,
)


@pytest.fixture(autouse=True)
def _seeded():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def randomise_affine(*layers):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(1 + 0.5 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=g))


def buffers(layer):
    return {k: v.clone() for k, v in layer.named_buffers()}


# ---------------------------------------------------------------------------------- ghost BN
GHOST_CASES = [
    (GhostBatchNorm1d, nn.BatchNorm1d, (5,)),        # MLP features (N, C)
    (GhostBatchNorm1d, nn.BatchNorm1d, (5, 7)),      # 1-D conv maps (N, C, L)
    (GhostBatchNorm2d, nn.BatchNorm2d, (5, 3, 4)),   # images (N, C, H, W)
]


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", GHOST_CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_equals_k_separate_batchnorm_calls(ghost_cls, bn_cls, shape, momentum):
    v, k = 4, 3
    ghost = ghost_cls(shape[0], virtual_batch_size=v, momentum=momentum)
    bn = bn_cls(shape[0], momentum=momentum)
    randomise_affine(ghost, bn)
    bn.load_state_dict(ghost.state_dict())
    x = torch.randn(k * v, *shape) * 3 + 1
    xg, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(k * v, *shape)

    for _ in range(2):   # twice: the second pass starts from updated running statistics
        out_g = ghost(xg)
        out_b = torch.cat([bn(xb[i * v:(i + 1) * v]) for i in range(k)])
        torch.testing.assert_close(out_g, out_b, rtol=0, atol=1e-6)
    (out_g * upstream).sum().backward()
    (out_b * upstream).sum().backward()
    torch.testing.assert_close(xg.grad, xb.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(ghost.bias.grad, bn.bias.grad, rtol=0, atol=1e-5)
    for name, value in bn.named_buffers():
        torch.testing.assert_close(getattr(ghost, name), value, rtol=0, atol=1e-6)
    assert int(ghost.num_batches_tracked) == 2 * k
    # And it is not plain BN over the whole batch (the statistics differ per virtual batch).
    assert not torch.allclose(ghost(x), bn_cls(shape[0])(x), atol=1e-3)


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", GHOST_CASES)
def test_ghost_eval_is_batchnorm_with_running_statistics(ghost_cls, bn_cls, shape):
    ghost = ghost_cls(shape[0], virtual_batch_size=4)
    randomise_affine(ghost)
    for _ in range(5):
        ghost(torch.randn(16, *shape) * 2 + 3)
    bn = bn_cls(shape[0])
    bn.load_state_dict(ghost.state_dict())           # same parameters and buffers: interchangeable
    ghost.eval(), bn.eval()
    x = torch.randn(3, *shape)                        # a batch smaller than the virtual batch is fine in eval
    before = buffers(ghost)
    assert torch.equal(ghost(x), bn(x))
    expected = (x - bn.running_mean.view(-1, *[1] * (x.dim() - 2))) / (
        bn.running_var.view(-1, *[1] * (x.dim() - 2)) + bn.eps).sqrt()
    expected = expected * bn.weight.view(-1, *[1] * (x.dim() - 2)) + bn.bias.view(-1, *[1] * (x.dim() - 2))
    torch.testing.assert_close(ghost(x), expected.detach())
    assert all(torch.equal(before[k], v) for k, v in ghost.named_buffers())


def test_ghost_with_virtual_batch_equal_to_batch_is_batchnorm():
    ghost, bn = GhostBatchNorm1d(6, virtual_batch_size=8), nn.BatchNorm1d(6)
    x = torch.randn(8, 6)
    assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost.running_mean, bn.running_mean)


@pytest.mark.parametrize("remainder, sizes", [("merge", [4, 6]), ("separate", [4, 4, 2])])
def test_ghost_non_dividing_virtual_batch(remainder, sizes):
    ghost = GhostBatchNorm1d(3, virtual_batch_size=4, remainder=remainder)
    bn = nn.BatchNorm1d(3)
    assert ghost.virtual_sizes(10) == sizes
    x = torch.randn(10, 3)
    out = ghost(x)
    torch.testing.assert_close(out, torch.cat([bn(c) for c in x.split(sizes)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=0, atol=1e-6)
    assert int(ghost.num_batches_tracked) == len(sizes)


def test_ghost_remainder_error_and_single_example_leftover():
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide the batch of 10"):
        GhostBatchNorm1d(3, virtual_batch_size=4, remainder="error")(torch.randn(10, 3))
    ghost = GhostBatchNorm1d(3, virtual_batch_size=4, remainder="separate")
    with pytest.raises(ValueError, match="virtual batch of 1 example"):
        ghost(torch.randn(9, 3))
    assert int(ghost.num_batches_tracked) == 0
    assert GhostBatchNorm1d(3, 4).virtual_sizes(9) == [4, 5]   # merge (the default) handles it


@pytest.mark.parametrize("value, error", [(1, ValueError), (0, ValueError), (-4, ValueError),
                                          (True, TypeError), (2.5, TypeError), ("8", TypeError)])
def test_ghost_rejects_bad_virtual_batch_size(value, error):
    with pytest.raises(error, match="virtual_batch_size"):
        GhostBatchNorm1d(3, virtual_batch_size=value)
    with pytest.raises(error, match="virtual_batch_size"):
        GhostBatchNorm2d(3, virtual_batch_size=value)


def test_ghost_rejects_bad_remainder():
    with pytest.raises(ValueError, match="remainder"):
        GhostBatchNorm1d(3, 4, remainder="drop")


def test_ghost_virtual_batch_larger_than_batch_raises_before_any_change():
    ghost = GhostBatchNorm1d(3, virtual_batch_size=32)
    before = buffers(ghost)
    with pytest.raises(ValueError, match=r"virtual_batch_size=32 is larger than the batch \(8 examples\)"):
        ghost(torch.randn(8, 3))
    assert all(torch.equal(before[k], v) for k, v in ghost.named_buffers())


def test_ghost_checks_input_rank():
    with pytest.raises(ValueError):
        GhostBatchNorm2d(3, 2)(torch.randn(8, 3))
    with pytest.raises(ValueError):
        GhostBatchNorm1d(3, 2)(torch.randn(8, 3, 2, 2))


def test_ghost_from_batch_norm_copies_everything():
    bn = nn.BatchNorm2d(4, momentum=0.3, eps=1e-3).double()
    randomise_affine(bn)
    bn(torch.randn(6, 4, 2, 2, dtype=torch.float64))
    ghost = GhostBatchNorm2d.from_batch_norm(bn, virtual_batch_size=3)
    assert (ghost.momentum, ghost.eps, ghost.virtual_batch_size) == (0.3, 1e-3, 3)
    assert ghost.weight.dtype == torch.float64
    for name, value in bn.state_dict().items():
        assert torch.equal(ghost.state_dict()[name], value)


# ---------------------------------------------------------------------------------- convert_norm
def test_convert_batch_to_ghost_in_place_keeps_parameters_and_statistics():
    model = MLP(8, (6, 6), 3, norm="batch")
    model(torch.randn(32, 8))
    randomise_affine(model[2], model[5])
    reference = copy.deepcopy(model).eval()
    out = convert_norm(model, "ghost", virtual_batch_size=8)
    assert out is model
    assert [type(m) for _, m in norm_layers(model)] == [GhostBatchNorm1d, GhostBatchNorm1d]
    assert model[2].virtual_batch_size == 8 and model.training
    x = torch.randn(5, 8)
    assert torch.equal(model.eval()(x), reference(x))          # eval: identical BN
    # and back again
    convert_norm(model, "batch")
    assert type(model[2]) is nn.BatchNorm1d and torch.equal(model(x), reference(x))


def test_convert_copy_leaves_the_original():
    model = CNN1d(norm="batch")
    kinds = [type(m) for m in model.modules()]
    converted = convert_norm(model, "group", inplace=False)
    assert converted is not model
    assert [type(m) for m in model.modules()] == kinds
    assert all(isinstance(m, nn.GroupNorm) for _, m in norm_layers(converted))


def test_convert_to_group_matches_a_model_built_with_group_norm():
    model = CNN1d(norm="batch")
    randomise_affine(*[m for _, m in norm_layers(model)])
    built = CNN1d(norm="group")
    convert_norm(model, "group")
    assert [repr(m) for m in model.modules()] == [repr(m) for m in built.modules()]
    built.load_state_dict(model.state_dict())                 # same layout, gamma and beta carried over
    x = torch.randn(7, 40)
    assert torch.equal(model(x), built(x))
    assert not torch.equal(model[2].weight, torch.ones(25))


def test_convert_to_layer_matches_layer_norm_models():
    mlp = MLP(8, (6, 6), 3, norm="batch")
    randomise_affine(*[m for _, m in norm_layers(mlp)])
    built = MLP(8, (6, 6), 3, norm="layer")                    # nn.LayerNorm(C)
    built.load_state_dict(mlp.state_dict(), strict=False)
    with torch.no_grad():
        for (_, src), (_, dst) in zip(norm_layers(mlp), norm_layers(built)):
            dst.weight.copy_(src.weight), dst.bias.copy_(src.bias)
    convert_norm(mlp, "layer")
    x = torch.randn(5, 8)
    torch.testing.assert_close(mlp(x), built(x), rtol=0, atol=1e-6)   # GroupNorm(1, C) == LayerNorm(C) on (N, C)

    cnn = CNN1d(norm="batch")
    convert_norm(cnn, "layer")
    cnn_built = CNN1d(norm="layer")                           # GroupNorm(1, C) over (C, L)
    assert [repr(m) for m in cnn.modules()] == [repr(m) for m in cnn_built.modules()]
    cnn_built.load_state_dict(cnn.state_dict())
    x = torch.randn(3, 40)
    assert torch.equal(cnn(x), cnn_built(x))


def test_convert_layer_norm_to_batch_and_conv2d_group_norm_to_batch2d():
    mlp = MLP(8, (6,), 3, norm="layer")
    randomise_affine(mlp[2])
    gamma = mlp[2].weight.detach().clone()
    convert_norm(mlp, "batch")
    assert type(mlp[2]) is nn.BatchNorm1d and int(mlp[2].num_batches_tracked) == 0
    assert torch.equal(mlp[2].weight, gamma) and torch.equal(mlp[2].running_var, torch.ones(6))
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    convert_norm(net, "ghost", virtual_batch_size=2)
    assert type(net[1]) is GhostBatchNorm2d
    assert net(torch.randn(4, 1, 6, 6)).shape == (4, 2)


def test_convert_to_none_and_single_layer():
    model = MLP(8, (6,), 3, norm="batch")
    convert_norm(model, "none")
    assert isinstance(model[2], nn.Identity)
    layer = nn.BatchNorm1d(6)
    new = convert_norm(layer, "group", groups=2)
    assert isinstance(new, nn.GroupNorm) and new.num_groups == 2 and isinstance(layer, nn.BatchNorm1d)


@pytest.mark.parametrize("to", CONVERT_TARGETS)
def test_convert_single_layer_keeps_its_mode(to):
    for training in (True, False):
        layer = nn.BatchNorm1d(6).train(training)
        assert convert_norm(layer, to, inplace=False).training is training
        assert convert_norm(nn.Sequential(layer), to)[0].training is training


def test_convert_keep_affine_false_and_dtype():
    model = MLP(8, (6,), 3, norm="batch").double()
    randomise_affine(model[2])
    convert_norm(model, "group", groups=3, keep_affine=False)
    assert torch.equal(model[2].weight, torch.ones(6, dtype=torch.float64))
    assert model[2].weight.dtype == torch.float64


@pytest.mark.parametrize("to", ["ghost", "group"])
def test_convert_a_layer_shared_by_two_slots_converts_both_and_keeps_them_shared(to):
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.ReLU(), nn.Linear(4, 4), bn)
    expected = GhostBatchNorm1d if to == "ghost" else nn.GroupNorm
    for inplace in (False, True):
        out = convert_norm(model, to, virtual_batch_size=4, inplace=inplace)
        assert isinstance(out[1], expected) and out[4] is out[1]      # both slots converted, still one layer


@pytest.mark.parametrize("to", ["batch", "ghost"])
@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 6, affine=False), nn.LayerNorm(6, elementwise_affine=False)])
def test_convert_affine_less_norm_takes_the_models_dtype(to, norm):
    model = nn.Sequential(nn.Linear(4, 6), copy.deepcopy(norm)).double()     # the norm layer has no tensors
    convert_norm(model, to, virtual_batch_size=4)
    assert model[1].running_mean.dtype == torch.float64
    x = torch.randn(8, 4, dtype=torch.float64)
    assert model(x).dtype == torch.float64 and model.eval()(x).dtype == torch.float64


@pytest.mark.parametrize("to", ["batch", "ghost"])
def test_convert_keep_affine_false_between_batch_norms_resets_gamma_beta_only(to):
    model = MLP(8, (6,), 3, norm="batch")
    randomise_affine(model[2])
    _ = model(torch.randn(32, 8))                          # running statistics away from 0 and 1
    stats = {k: v.clone() for k, v in model[2].state_dict().items() if k.startswith(("running", "num"))}
    out = convert_norm(model, to, virtual_batch_size=16, keep_affine=False, inplace=False)[2]
    assert torch.equal(out.weight, torch.ones(6)) and torch.equal(out.bias, torch.zeros(6))
    for k, v in stats.items():                             # statistics still carry over
        assert torch.equal(out.state_dict()[k], v)


def test_convert_keep_affine_false_layer_norm_to_layer():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    randomise_affine(model[1])
    out = convert_norm(model, "layer", keep_affine=False, inplace=False)[1]
    assert torch.equal(out.weight, torch.ones(6)) and torch.equal(out.bias, torch.zeros(6))
    assert not torch.equal(model[1].weight, torch.ones(6))    # the original keeps its own


def test_convert_errors_leave_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 8), nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match="groups=3 does not divide the 8 channels of 3"):
        convert_norm(model, "group", groups=3)
    assert type(model[1]) is nn.BatchNorm1d and type(model[3]) is nn.BatchNorm1d
    with pytest.raises(ValueError, match="model has no normalisation layers"):
        convert_norm(MLP(norm="none"), "batch")
    with pytest.raises(ValueError, match="to must be one of"):
        convert_norm(model, "instance")
    with pytest.raises(ValueError, match="groups is only used with to='group'"):
        convert_norm(model, "layer", groups=2)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        convert_norm(model, "ghost", virtual_batch_size=1)
    with pytest.raises(ValueError, match="remainder"):
        convert_norm(model, "ghost", remainder="nope")
    with pytest.raises(TypeError, match="model must be"):
        convert_norm("model", "batch")
    with pytest.raises(TypeError, match="keep_affine must be True or False, got 'no'"):
        convert_norm(model, "group", groups=2, keep_affine="no")
    with pytest.raises(ValueError, match="LayerNorm over shape"):
        convert_norm(nn.Sequential(nn.LayerNorm((3, 4))), "batch")
    with pytest.raises(ValueError, match="BatchNorm3d"):
        convert_norm(nn.Sequential(nn.BatchNorm3d(2)), "ghost")
    assert type(model[1]) is nn.BatchNorm1d


# ---------------------------------------------------------------------------------- statistics
def test_recorder_compares_batch_with_running_statistics_before_the_update():
    model = nn.Sequential(nn.BatchNorm1d(3))
    x = torch.randn(16, 3) * 2 + 5
    with BNStatsRecorder(model) as rec:
        model(x)                                   # running stats were 0 / 1 before this update
        model(x)
        model.eval()(x)                            # eval forwards are not recorded
    model.train()(x)                               # hooks removed on exit
    assert [r["call"] for r in rec.rows] == [0, 1]
    mean, var = x.mean(0), x.var(0)
    first = rec.rows[0]
    torch.testing.assert_close(torch.tensor(first["mean_shift"]), (mean.abs() / (1 + 1e-5) ** 0.5).mean())
    torch.testing.assert_close(torch.tensor(first["var_ratio"]), ((var + 1e-5) / (1 + 1e-5)).mean())
    second_running = 0.1 * mean
    torch.testing.assert_close(torch.tensor(rec.rows[1]["mean_shift"]),
                               ((mean - second_running).abs() / (0.9 + 0.1 * var + 1e-5).sqrt()).mean())
    assert rec.rows[0]["batch_size"] == 16 and rec.rows[0]["layer"] == "0"


def test_recorder_every_and_errors():
    model = MLP(8, (4, 4), 2, norm="batch")
    rec = BNStatsRecorder(model, every=2)
    for _ in range(5):
        model(torch.randn(8, 8))
    rec.remove()
    assert [(r["layer"], r["call"]) for r in rec.rows] == [("2", 0), ("5", 0), ("2", 2), ("5", 2), ("2", 4), ("5", 4)]
    with pytest.raises(ValueError, match="no batch-norm layers"):
        BNStatsRecorder(MLP())
    with pytest.raises(ValueError, match="every"):
        BNStatsRecorder(model, every=0)


def test_batch_stats_changes_nothing_and_matches_hand_computation():
    model = MLP(8, (6,), 3, norm="batch")
    for _ in range(3):
        model(torch.randn(32, 8) + 1)
    model.eval()
    before = buffers(model[2])
    x = torch.randn(100, 8)
    row, = batch_stats(model, x, mode="train")
    assert not model.training and not model[2].training
    assert all(torch.equal(before[k], v) for k, v in model[2].named_buffers())
    h = model[1](x).detach()
    expected = ((h.mean(0) - model[2].running_mean).abs() / (model[2].running_var + 1e-5).sqrt()).mean()
    torch.testing.assert_close(torch.tensor(row["mean_shift"]), expected)
    with pytest.raises(ValueError, match="mode"):
        batch_stats(model, x, mode="test")
    with pytest.raises(ValueError, match="at least 2 examples"):
        batch_stats(model, x[:1])


def test_batch_stats_train_and_eval_differ_downstream():
    model = MLP(8, (6, 6), 3, norm="batch")              # never trained: running 0 / 1
    x = torch.randn(200, 8) * 3
    train_rows = batch_stats(model, x, mode="train")
    eval_rows = batch_stats(model, x, mode="eval")
    # The first BN sees the same input in both modes; the second does not (upstream BN differs).
    assert train_rows[0]["mean_shift"] == pytest.approx(eval_rows[0]["mean_shift"])
    assert train_rows[1]["var_ratio"] != pytest.approx(eval_rows[1]["var_ratio"], rel=1e-3)


def test_batch_stat_noise_follows_the_sampling_formula():
    model = MLP(8, (16, 16), 2, norm="batch")
    x = torch.randn(400, 8) * 2
    rows = batch_stat_noise(model, x, [4, 16, 64, 400], draws=300, seed=1)
    first = {r["batch_size"]: r for r in rows if r["layer"] == "2"}
    for b in (4, 16, 64):
        assert first[b]["mean_noise"] / first[b]["predicted_mean_noise"] == pytest.approx(1.0, abs=0.12)
        assert first[b]["predicted_mean_noise"] == pytest.approx((400 - b) / (b * 399))
    # the whole pool: no noise at all, in every layer
    assert all(r["mean_noise"] < 1e-10 and r["var_noise"] < 1e-8 for r in rows if r["batch_size"] == 400)
    # noise falls with B in the deeper layer too
    second = [r["mean_noise"] for r in rows if r["layer"] == "5"]
    assert second == sorted(second, reverse=True)


def test_batch_stat_noise_errors():
    model = MLP(8, (4,), 2, norm="batch")
    x = torch.randn(50, 8)
    for bad in ([1], [51], [], [2.0]):
        with pytest.raises(ValueError, match="batch_sizes"):
            batch_stat_noise(model, x, bad)
    with pytest.raises(ValueError, match="draws"):
        batch_stat_noise(model, x, [4], draws=0)
    with pytest.raises(TypeError, match="x must be a tensor"):
        batch_stat_noise(model, [1, 2], [4])


# ---------------------------------------------------------------------------------- check_bn
def trained_bn_model():
    model = MLP(8, (6,), 3, norm="batch")
    x = torch.randn(512, 8) * 2 + 1
    for _ in range(4):                       # 64 updates: the initial 0 / 1 estimates have decayed away
        for i in range(0, 512, 32):
            model(x[i:i + 32])
    return model, x


def test_check_bn_finds_train_mode_and_never_updated():
    model = MLP(8, (6,), 3, norm="batch")
    report = check_bn(model)
    assert not report.ok and len(report.problems) == 2
    assert "training mode" in report.problems[0] and "model.eval()" in report.problems[0]
    assert "never updated" in report.problems[1]
    assert "call model.eval() first" in str(report)


def test_check_bn_finds_stale_statistics_and_precise_bn_fixes_them():
    model, x = trained_bn_model()
    model.eval()
    assert check_bn(model, x).ok
    with torch.no_grad():
        model[2].running_mean += 3 * model[2].running_var.sqrt()   # stale: 3 std off
    before = buffers(model[2])
    report = check_bn(model, x)
    assert not report.ok and "stale running statistics" in report.problems[0]
    assert report.layers[0]["mean_shift"] == pytest.approx(3.0, abs=0.5)
    assert all(torch.equal(before[k], v) for k, v in model[2].named_buffers())   # checking changes nothing
    precise_bn(model, x, batch_size=64, num_batches=8)
    assert check_bn(model, x).ok and not model.training


def test_check_bn_variance_and_other_findings():
    model, x = trained_bn_model()
    model.eval()
    with torch.no_grad():
        model[2].running_var *= 9
    assert "stale" in str(check_bn(model, x))
    assert check_bn(model, x, max_var_ratio=20).ok
    assert check_bn(MLP().eval(), torch.randn(4, 40)).ok           # no BN, nothing to find
    free = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    assert "track_running_stats=False" in str(check_bn(free, torch.randn(8, 4)))
    for kwargs in ({"max_mean_shift": 0}, {"max_var_ratio": 1.0}, {"max_var_ratio": "2"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            check_bn(model, **kwargs)


# ---------------------------------------------------------------------------------- precise_bn
def test_precise_bn_is_the_average_of_batch_statistics():
    model = MLP(8, (6, 6), 3, norm="batch")
    randomise_affine(model[2], model[5])
    batches = [torch.randn(32, 8) * 2 + i for i in range(4)]
    weights_before = [p.clone() for p in model.parameters()]
    model.eval()
    precise_bn(model, [(b, torch.zeros(32)) for b in batches])
    assert not model.training and model[2].momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))
    assert int(model[2].num_batches_tracked) == 4
    # First BN: its input is the first Linear's output, fixed by the weights.
    h = [model[1](b).detach() for b in batches]
    torch.testing.assert_close(model[2].running_mean, torch.stack([t.mean(0) for t in h]).mean(0))
    torch.testing.assert_close(model[2].running_var, torch.stack([t.var(0) for t in h]).mean(0))
    # Second BN: the same average, of inputs computed in train mode (the first BN on batch statistics).
    bn1 = nn.BatchNorm1d(6)
    bn1.load_state_dict(model[2].state_dict())
    h2 = [model[4](model[3](bn1.train()(t))).detach() for t in h]
    torch.testing.assert_close(model[5].running_mean, torch.stack([t.mean(0) for t in h2]).mean(0))
    torch.testing.assert_close(model[5].running_var, torch.stack([t.var(0) for t in h2]).mean(0))


def test_precise_bn_data_forms_agree():
    model, x = trained_bn_model()
    y = torch.zeros(len(x), dtype=torch.long)
    results = []
    for data in (x, (x, y), DataBundle(x, y, x[:10], y[:10], num_classes=3, description="t", spec={"name": "t"})):
        m = copy.deepcopy(model)
        precise_bn(m, data, batch_size=64, num_batches=12, seed=3)   # 12 > 8 batches per pass: wraps
        assert int(m[2].num_batches_tracked) == 12
        results.append(m[2].running_mean.clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_precise_bn_errors_restore_the_statistics():
    model, x = trained_bn_model()
    before = buffers(model[2])
    with pytest.raises(ValueError, match="gave no batches"):
        precise_bn(model, [])
    with pytest.raises(RuntimeError):
        precise_bn(model, [torch.randn(8, 8), torch.randn(8, 5)])     # the second batch fails
    assert all(torch.equal(before[k], v) for k, v in model[2].named_buffers())
    assert model[2].momentum == 0.1 and model.training
    with pytest.raises(ValueError, match="batch_size is needed"):
        precise_bn(model, x)
    with pytest.raises(ValueError, match="batch_size=1000 is larger"):
        precise_bn(model, x, batch_size=1000)
    with pytest.raises(ValueError, match="batch_size is only used"):
        precise_bn(model, [x], batch_size=8)
    with pytest.raises(ValueError, match="num_batches"):
        precise_bn(model, x, batch_size=8, num_batches=0)
    with pytest.raises(TypeError, match="data must be"):
        precise_bn(model, 3)
    with pytest.raises(ValueError, match="no batch-norm layers"):
        precise_bn(MLP(), x)
    assert all(torch.equal(before[k], v) for k, v in model[2].named_buffers())


# ---------------------------------------------------------------------------------- accumulation
def bn_warnings(records):
    return [w for w in records if issubclass(w.category, BatchNormAccumulationWarning)]


def fit_weights(model, toy, accumulate, **kw):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        t = Trainer(model, toy, batch_size=32, lr=0.1, optimizer="sgd", accumulate=accumulate, seed=0,
                    device="cpu", **kw)
        t.fit(steps=3)
    return t.model, bn_warnings(records)


def test_trainer_warns_once_when_accumulating_over_batch_norm(toy):
    model, found = fit_weights(MLP(8, (16,), 3, norm="batch"), toy, accumulate=4)
    assert len(found) == 1
    message = str(found[0].message)
    assert "accumulate=4" in message and "micro-batch of 8 examples" in message
    assert "convert_norm(model, 'ghost'" in message and "'group'" in message
    assert found[0].filename == __file__                 # points at the caller, not the library


@pytest.mark.parametrize("norm, accumulate", [("none", 4), ("group", 4), ("batch", 1)])
def test_trainer_does_not_warn_without_bn_or_without_accumulation(toy, norm, accumulate):
    _, found = fit_weights(MLP(8, (16,), 3, norm=norm), toy, accumulate=accumulate)
    assert found == []


def test_trainer_warns_when_the_online_noise_scale_splits_a_batch_norm_step(toy):
    """Without accumulation a measured step runs as two half-batches: over BN that changes the update."""
    _, found = fit_weights(MLP(8, (16,), 3, norm="batch"), toy, accumulate=1, noise_scale_every=2)
    assert len(found) == 1
    message = str(found[0].message)
    assert message.startswith("noise_scale_every=2 (measured steps run as two half-batches)")
    assert "micro-batch of 16 examples" in message
    _, found = fit_weights(MLP(8, (16,), 3), toy, accumulate=1, noise_scale_every=2)
    assert found == []                                   # no BN: the halves give the same update


def test_accumulation_is_exact_without_bn_and_with_matching_ghost_bn_but_not_with_bn(toy):
    def run(model, accumulate):
        return fit_weights(copy.deepcopy(model), toy, accumulate)

    def max_diff(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values())
                   if p.is_floating_point())

    plain = MLP(8, (16,), 3)
    (one, _), (acc, _) = run(plain, 1), run(plain, 4)
    assert max_diff(one, acc) < 1e-6                     # float roundoff only

    bn = MLP(8, (16,), 3, norm="batch")
    (one, _), (acc, found) = run(bn, 1), run(bn, 4)
    assert max_diff(one, acc) > 1e-3 and len(found) == 1   # micro-batch statistics: a different update

    ghost = convert_norm(MLP(8, (16,), 3, norm="batch"), "ghost", virtual_batch_size=8)
    (one, _), (acc, found) = run(ghost, 1), run(ghost, 4)
    assert max_diff(one, acc) < 1e-6 and found == []    # virtual batch = micro-batch: the same update,
    # running statistics included (compared above as part of the state dict)


def test_warn_accumulation_with_bn_cases():
    ghost = convert_norm(MLP(8, (4,), 2, norm="batch"), "ghost", virtual_batch_size=8)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert warn_accumulation_with_bn(ghost, 32, 4) is False        # micro 8, virtual 8
        assert warn_accumulation_with_bn(ghost, 32, 2) is False        # micro 16 = 2 virtual batches of 8
        assert warn_accumulation_with_bn(ghost, 30, 4) is True         # micro 8, 8, 7, 7
        assert warn_accumulation_with_bn(ghost, 32, 8) is True         # micro 4 < virtual 8
    assert len(bn_warnings(records)) == 2
    assert "micro-batch of 7 or 8 examples" in str(bn_warnings(records)[0].message)


def test_bn_layers_lists_ghost_and_plain():
    model = nn.Sequential(nn.BatchNorm1d(3), GhostBatchNorm1d(3, 2), nn.GroupNorm(1, 3), make_norm("layer", 3))
    assert [n for n, _ in bn_layers(model)] == ["0", "1"]
    assert [n for n, _ in norm_layers(model)] == ["0", "1", "2", "3"]


@requires_cuda
def test_ghost_convert_and_precise_bn_on_cuda():
    ghost, bn = GhostBatchNorm2d(4, 8).cuda(), nn.BatchNorm2d(4).cuda()
    x = torch.randn(32, 4, 5, 5, device="cuda")
    torch.testing.assert_close(ghost(x), torch.cat([bn(c) for c in x.split(8)]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    model = convert_norm(MLP(8, (6,), 3, norm="batch").cuda(), "ghost", virtual_batch_size=4)
    assert model[2].weight.device.type == "cuda" and model[2].running_mean.device.type == "cuda"
    x = torch.randn(64, 8)                                      # CPU data, CUDA model
    precise_bn(model, x, batch_size=64, num_batches=1)
    h = model[1](x.cuda()).detach()
    torch.testing.assert_close(model[2].running_mean, torch.stack([c.mean(0) for c in h.split(4)]).mean(0))
    assert check_bn(model.eval(), x).ok


def test_ghost_agrees_with_the_benchmarks_vectorised_versions():
    # bench/bench_norms.py times two vectorised ghost BNs (one reduction over (k, v, C), and one
    # fused batch_norm over (v, k*C) with the running estimates in closed form); they are a second,
    # independent reference for GhostBatchNorm1d, and the timing is void unless they agree.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_norms.py"
    spec = importlib.util.spec_from_file_location("bench_norms", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for cls in (bench.VectorGhostBatchNorm1d, bench.FusedGhostBatchNorm1d):
        assert bench.check_vector_ghost(cls, 16, 128) < 1e-5
