import copy
import math
import weakref

import pytest
import torch
import torch.nn as nn

from helpers import requires_cuda, same_weights, weights
from nbbatch import TrainConfig, Trainer
from nbbatch.memory import (MemoryModel, account_step, compare_configs, find_knee, find_max_batch_size, fit_step_time,
                            measure, plan)
from nbbatch.models import MLP
from nbbatch.recompute import Checkpointed, CheckpointedSequential, checkpointed

F32, I64 = 4, 8


def data(n=256, d=40, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def n_params(d_in, hidden, classes):
    widths = [d_in, *hidden, classes]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def hand_saved(B, d_in, hidden, classes):
    """What autograd keeps for Linear/ReLU layers and cross-entropy, from the layer shapes:
    the input (saved by the first Linear), each ReLU output (saved by ReLU and by the next
    Linear: one storage), the log-probabilities, the int64 labels, the 0-d total weight."""
    return B * F32 * (d_in + sum(hidden) + classes) + B * I64 + F32


# ---------------------------------------------------------------------------- exact accounting
@pytest.mark.parametrize("B,d_in,hidden,classes", [(32, 40, (100,), 10), (17, 8, (16, 16, 16), 3), (64, 64, (), 10)])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_accounting_equals_hand_count(B, d_in, hidden, classes, opt):
    torch.manual_seed(0)
    x, y = data(B, d_in, classes)
    t = Trainer(MLP(d_in, hidden, classes), (x, y), batch_size=B, optimizer=opt)
    parts = account_step(t)
    P = n_params(d_in, hidden, classes)
    tensors = 2 * (len(hidden) + 1)
    assert parts.params == parts.grads == P * F32
    assert parts.optimizer == {"sgd": 0, "momentum": P * F32, "adam": 2 * P * F32 + tensors * F32}[opt]
    assert parts.saved == hand_saved(B, d_in, hidden, classes)
    assert parts.recompute == parts.kept == 0
    assert parts.total == parts.params + parts.grads + parts.optimizer + parts.saved


class Square(nn.Module):
    def forward(self, h):
        return h * h   # mul saves both operands: the same storage, counted once


def test_shared_storage_is_counted_once():
    B, d, h, c = 16, 8, 12, 3
    torch.manual_seed(0)
    x, y = data(B, d, c)
    t = Trainer(nn.Sequential(nn.Linear(d, h), Square(), nn.Linear(h, c)), (x, y), batch_size=B)
    # input, the Linear output (saved twice by mul), the square (saved by the next Linear), CE
    assert account_step(t).saved == B * F32 * (d + h + h + c) + B * I64 + F32


def test_buffers_saved_for_backward_are_not_counted_twice():
    # batch norm in eval mode (frozen statistics) saves its running mean and variance for
    # backward: buffers, already counted in params
    B, d, h, c = 32, 8, 16, 3
    torch.manual_seed(0)
    x, y = data(B, d, c)
    model = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.Linear(h, c))
    t = Trainer(model, (x, y), batch_size=B)
    model.eval()
    parts = account_step(t)
    assert parts.params == F32 * (d * h + h + 2 * h + h * c + c + 2 * h) + I64   # + running stats, count
    # input, the Linear output (saved by batch norm), its output (saved by the next Linear), CE
    assert parts.saved == B * F32 * (d + h + h + c) + B * I64 + F32


def test_accumulation_keeps_micro_batch_activations_and_the_whole_batch():
    B, k, d, hidden, c = 64, 4, 40, (100, 50), 10
    x, y = data(B, d, c)
    t = Trainer(MLP(d, hidden, c), (x, y), batch_size=B, accumulate=k)
    # micro-batches are views of the step's batch: its storage (inputs, labels) is alive and
    # counted whole; the activations are those of one micro-batch (graphs freed in turn)
    m = B // k
    assert account_step(t).saved == B * F32 * d + B * I64 + m * F32 * (sum(hidden) + c) + F32


def test_bf16_autocast_halves_activations_on_cpu():
    B, d, hidden, c = 32, 40, (100, 50), 10
    x, y = data(B, d, c)
    t = Trainer(MLP(d, hidden, c), (x, y), batch_size=B, precision="bf16")
    # bf16 copies of the input, ReLU outputs and of the weights autograd needs (all but the
    # first layer's), fp32 log-probabilities (autocast runs softmax in fp32), labels, weight
    bf16 = 2
    weights_cast = 100 * 50 + 50 * 10
    expected = B * bf16 * (d + sum(hidden)) + bf16 * weights_cast + B * F32 * c + B * I64 + F32
    assert account_step(t).saved == expected


# ---------------------------------------------------------------------------- checkpointing
def test_checkpointed_gradients_equal_plain_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                        nn.Dropout(0.3), nn.Linear(32, 3))
    x, y = data(24, 8, 3)
    grads = []
    for segments in (0, 2, 3):
        net.zero_grad()
        torch.manual_seed(1)
        loss = nn.functional.cross_entropy(checkpointed(net, segments)(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_marked_blocks_give_plain_gradients_and_are_counted():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU())

    class Net(nn.Module):   # not an nn.Sequential: the user marks the block
        def __init__(self, mark):
            super().__init__()
            self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
            self.block = Checkpointed(block) if mark else block

        def forward(self, x):
            return self.out(self.block(torch.tanh(self.inp(x))))

    x, y = data(24, 8, 3)
    plain, marked = Net(False), Net(True)
    marked.load_state_dict(plain.state_dict(), strict=False)
    marked.inp, marked.out = plain.inp, plain.out
    grads = []
    for net in (plain, marked):
        net.zero_grad()
        torch.manual_seed(1)
        nn.functional.cross_entropy(net(x), y).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    B = 24
    p_parts = account_step(Trainer(copy.deepcopy(plain), (x, y), batch_size=B))
    m_parts = account_step(Trainer(copy.deepcopy(marked), (x, y), batch_size=B))
    # inside the block the plain net keeps the first ReLU's output, dropout's float noise (CPU
    # dropout multiplies by it) and dropout's output; the block output is kept by self.out anyway
    assert p_parts.saved - m_parts.saved == B * 16 * 3 * F32
    # marked: the block input is kept; backward's recomputation holds those three and the output
    assert m_parts.kept == B * 16 * F32 and m_parts.recompute == B * 16 * 4 * F32
    with pytest.raises(TypeError, match="block"):
        Checkpointed("layer")


def test_trainer_with_checkpointing_trains_identically(toy):
    x, y = toy
    runs = []
    for segments in (0, 2):
        torch.manual_seed(0)
        model = MLP(8, (16, 16), 3, dropout=0.2)
        t = Trainer(model, (x, y), batch_size=32, lr=0.1, optimizer="momentum", checkpoint_segments=segments, seed=2)
        t.fit(epochs=2)
        runs.append((model, t.history.steps["loss"]))
    assert same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_checkpointing_updates_batch_norm_statistics_once(toy):
    x, y = toy
    runs = []
    for segments in (0, 2, 3):
        torch.manual_seed(0)
        model = MLP(8, (16, 16, 16), 3, norm="batch")
        t = Trainer(model, (x, y), batch_size=32, lr=0.1, optimizer="momentum", checkpoint_segments=segments, seed=2)
        t.fit(epochs=2)
        runs.append(model.state_dict())
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])   # weights and running statistics
    # an accounted step (which also runs each chunk once more, to count its recomputation) too
    accounted = []
    for segments in (0, 3):
        torch.manual_seed(0)
        model = MLP(8, (16, 16, 16), 3, norm="batch")
        account_step(Trainer(model, (x, y), batch_size=32, checkpoint_segments=segments, seed=2))
        accounted.append(model.state_dict())
    assert all(torch.equal(accounted[0][k], accounted[1][k]) for k in accounted[0])


def test_checkpointing_accounting_counts_boundaries_and_recompute():
    B, d, hidden, c = 32, 40, (64, 64, 64), 10
    x, y = data(B, d, c)
    model = MLP(d, hidden, c)     # Flatten, 3 x (Linear, Identity, ReLU), Linear: 11 layers
    plain = account_step(Trainer(copy.deepcopy(model), (x, y), batch_size=B))
    ck = account_step(Trainer(copy.deepcopy(model), (x, y), batch_size=B, checkpoint_segments=2))
    # chunks: layers 0-4 (Flatten, Linear, Identity, ReLU, Linear) checkpointed, 5-10 plain.
    # Kept: the chunk input x; inside the last chunk: ReLU out 64, ReLU out 64, log-probs, labels.
    assert ck.saved == B * F32 * (d + 64 + 64 + c) + B * I64 + F32
    assert ck.kept == B * F32 * d
    # The recomputed chunk adds to its input the ReLU out 64 (shared with the next Linear).
    assert ck.recompute == B * F32 * 64
    assert ck.total == ck.fixed + ck.saved < plain.total
    assert ck.fixed == plain.fixed


def test_checkpointing_errors():
    with pytest.raises(ValueError, match="checkpoint_segments"):
        TrainConfig(checkpoint_segments=1)
    with pytest.raises(ValueError, match="checkpoint_segments"):
        TrainConfig(checkpoint_segments=-2)

    class NotSequential(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x)

    x, y = data(32, 8, 3)
    m = NotSequential()
    before = weights(m)
    with pytest.raises(TypeError, match="nn.Sequential"):
        Trainer(m, (x, y), batch_size=8, checkpoint_segments=2)
    with pytest.raises(ValueError, match="more than the model's 3 layers"):
        Trainer(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)), (x, y), batch_size=8, checkpoint_segments=4)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(m)))
    with pytest.raises(ValueError, match="segments"):
        CheckpointedSequential(nn.Sequential(nn.Linear(2, 2)), 1)


# ---------------------------------------------------------------------------- measure and the model
def test_measure_rows_model_untouched_and_exact_linear_fit():
    x, y = data(100)
    model = MLP(40, (100,), 10)
    before = weights(model)
    rng = torch.get_rng_state()
    report = measure(model, (x, y), [64, 16, 32, 256], steps=1, optimizer="adam")   # data repeated for 256
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert torch.equal(rng, torch.get_rng_state())
    assert report.batch_sizes == [16, 32, 64, 256]
    assert all(r["method"] == "accounting" and r["time_per_step"] > 0 and r["rss_peak"] > 0 for r in report.rows)
    fit = report.fit()
    P = n_params(40, (100,), 10)
    assert fit.per_example == pytest.approx(F32 * (40 + 100 + 10) + I64, rel=1e-9)
    assert fit.fixed == pytest.approx(P * F32 * 4 + 4 * F32 + F32, rel=1e-9)   # params, grads, Adam m and v, steps
    df = report.to_pandas()
    assert list(df["batch_size"]) == [16, 32, 64, 256]
    assert {"params", "grads", "optimizer", "saved", "total", "examples_per_s"} <= set(df.columns)


class FailsAbove(nn.Module):
    """A model whose forward raises (not out of memory) on batches above ``n`` examples."""

    def __init__(self, n):
        super().__init__()
        self.n, self.layer = n, nn.Linear(40, 10)

    def forward(self, x):
        if len(x) > self.n:
            raise RuntimeError("a bug in the model")
        return self.layer(x)


def test_measure_leaves_the_rng_alone_when_a_trial_raises():
    # the trial Trainer seeds torch before its step raises: the caller's RNG must come back anyway
    x, y = data(64)
    model = FailsAbove(16)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="a bug in the model"):
        measure(model, (x, y), [8, 32], steps=0, seed=0)
    assert torch.equal(rng, torch.get_rng_state())


class HugeAbove(nn.Module):
    """A model whose forward asks the CPU allocator for more than any machine has above ``n`` examples."""

    def __init__(self, n):
        super().__init__()
        self.n, self.layer = n, nn.Linear(40, 10)

    def forward(self, x):
        if len(x) > self.n:
            torch.empty(2**62, dtype=torch.uint8)   # a real allocation failure (RuntimeError)
        return self.layer(x)


def test_a_real_cpu_allocation_failure_is_an_out_of_memory_trial():
    x, y = data(64)
    report = measure(HugeAbove(16), (x, y), [8, 16, 32, 64], steps=0)
    assert [r.get("oom", False) for r in report.rows] == [False, False, True]
    r = find_max_batch_size(HugeAbove(20), (x, y), budget=10**9, margin=0)
    assert r.batch_size == 20 and any(t.get("oom") for t in r.trials)


@pytest.mark.parametrize("bad", [[], [0, 8], [-4], [2.5], "32"])
def test_measure_rejects_bad_batch_lists(bad):
    with pytest.raises((ValueError, TypeError), match="batch_sizes"):
        measure(MLP(40, (8,), 10), data(), bad)


def test_reports_and_models_draw_their_figures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, y = data(64)
    report = measure(MLP(40, (16,), 10), (x, y), [8, 16, 32], steps=1)
    ax = report.plot(budget=200_000)
    labels = [h.get_label() for h in ax.get_legend().legend_handles] if ax.get_legend() else []
    assert "measured" in labels and any(lbl.startswith("predicted limit") for lbl in labels)
    axes = report.plot_throughput()
    assert axes[0].get_xlabel() == "batch size" and len(axes[1].lines) >= 2
    c = compare_configs(MLP(40, (16,), 10), (x, y), {"a": {}, "b": {"accumulate": 2}}, 32, steps=1)
    assert len(c.plot()[0].patches) == 2
    assert "MemoryReport" in repr(report) and "ConfigComparison" in repr(c)
    plt.close("all")


def test_measure_rejects_configurations_the_device_cannot_run():
    with pytest.raises(ValueError, match="precision='fp16'"):
        measure(MLP(40, (8,), 10), data(), [8], precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="accumulate"):
        measure(MLP(40, (8,), 10), data(), [2, 8], accumulate=4)
    with pytest.raises(ValueError, match="steps"):
        measure(MLP(40, (8,), 10), data(), [8], steps=-1)
    with pytest.raises(TypeError, match="data must be"):
        measure(MLP(40, (8,), 10), [1, 2, 3], [8])
    with pytest.raises(TypeError, match="model"):
        measure("mlp", data(), [8])


def test_memory_model_fit_predict_limit_and_errors():
    m = MemoryModel.fit([10, 20, 40], [5000 + 10 * 100, 5000 + 20 * 100, 5000 + 40 * 100])
    assert m.fixed == pytest.approx(5000) and m.per_example == pytest.approx(100)
    assert m.predict(160) == pytest.approx(21000)
    assert m.max_batch_size(21000) == 160
    assert m.max_batch_size(20999) == 159
    assert m.max_batch_size(21000, round_to=8) == 160 and m.max_batch_size(20999, round_to=8) == 152
    assert m.max_batch_size(21000, round_to="pow2") == 128
    with pytest.raises(ValueError, match="model alone .* does not fit"):
        m.max_batch_size(4999)
    with pytest.raises(ValueError, match="no example"):
        m.max_batch_size(5050)
    with pytest.raises(ValueError, match="budget"):
        m.max_batch_size(-1)
    with pytest.raises(ValueError, match="round_to"):
        m.max_batch_size(21000, round_to=16)
    with pytest.raises(ValueError, match="two distinct"):
        MemoryModel.fit([8, 8], [1, 2])


# ---------------------------------------------------------------------------- the finder
def accounted_total(model, x, y, B, **options):
    return measure(model, (x, y), [B], steps=0, **options).rows[0]["total"]


@pytest.mark.parametrize("strategy", ["bisect", "model"])
@pytest.mark.parametrize("opt,accumulate", [("sgd", 1), ("adam", 1), ("momentum", 2)])
def test_finder_gives_the_largest_batch_within_the_budget(opt, accumulate, strategy):
    x, y = data(64)
    model = MLP(40, (32,), 10)
    budget = 300_000
    r = find_max_batch_size(model, (x, y), budget=budget, margin=0, optimizer=opt, accumulate=accumulate,
                            strategy=strategy)
    B = r.batch_size
    assert accounted_total(model, x, y, B, optimizer=opt, accumulate=accumulate) <= budget
    assert accounted_total(model, x, y, B + 1, optimizer=opt, accumulate=accumulate) > budget
    assert r.trials[-1]["batch_size"] in (B, B + 1)
    # the memory model from two small measurements predicts the same limit (memory is linear in B)
    fit = measure(model, (x, y), [8, 16], steps=0, optimizer=opt, accumulate=accumulate).fit()
    assert abs(fit.max_batch_size(budget) - B) <= 1 + accumulate


def test_model_guided_search_needs_few_trials_and_recovers_from_a_wrong_line(monkeypatch):
    x, y = data(64)
    model = MLP(40, (32,), 10)
    exact = find_max_batch_size(model, (x, y), budget=300_000, margin=0, strategy="model")
    bisect = find_max_batch_size(model, (x, y), budget=300_000, margin=0)
    assert exact.batch_size == bisect.batch_size
    assert [t["batch_size"] for t in exact.trials][2:] == [exact.batch_size, exact.batch_size + 1]
    assert len(exact.trials) == 4 < len(bisect.trials)
    # A memory that bends upward (as allocator rounding can) or flattens: the prediction from the
    # two small trials is off, and the gallop + bisection still ends at the true limit.
    from nbbatch.memory import trials
    real = trials.run_trial
    for bend in (lambda b: 0.1 * b * b, lambda b: -0.4 * b * min(b, 2000) / 2000 * 168):
        def bent(model, x, y, cfg, _bend=bend, **kw):
            row = real(model, x, y, cfg, **kw)
            row["total"] += int(_bend(cfg.batch_size))
            return row
        monkeypatch.setattr(trials, "run_trial", bent)
        guided = find_max_batch_size(model, (x, y), budget=300_000, margin=0, strategy="model")
        plain = find_max_batch_size(model, (x, y), budget=300_000, margin=0)
        assert guided.batch_size == plain.batch_size
        fits = {t["batch_size"]: t["fits"] for t in plain.trials + guided.trials}
        assert fits[guided.batch_size] is True and fits[guided.batch_size + 1] is False
        assert len(guided.trials) < len(plain.trials)
        monkeypatch.setattr(trials, "run_trial", real)


def test_finder_margin_and_rounding():
    x, y = data(64)
    model = MLP(40, (32,), 10)
    full = find_max_batch_size(model, (x, y), budget=300_000, margin=0).batch_size
    assert find_max_batch_size(model, (x, y), budget=300_000, margin=0.2).batch_size < full
    eight = find_max_batch_size(model, (x, y), budget=300_000, margin=0, round_to=8)
    assert eight.batch_size == full // 8 * 8 and eight.largest_fitting == full
    p2 = find_max_batch_size(model, (x, y), budget=300_000, margin=0, round_to="pow2").batch_size
    assert p2 == 2 ** int(math.log2(full))
    assert find_max_batch_size(model, (x, y), budget=10**9, limit=100).batch_size == 100


def test_finder_restores_trainer_state_bitwise(toy):
    x, y = toy
    runs = []
    for search in (False, True):
        torch.manual_seed(0)
        t = Trainer(MLP(8, (16,), 3, dropout=0.1), (x, y), batch_size=32, optimizer="adam", lr=0.01, seed=1)
        t.fit(steps=3)
        state = copy.deepcopy(t.state_dict())
        grads = [p.grad.clone() for p in t.model.parameters()]
        lr = t.optimizer.param_groups[0]["lr"]
        if search:
            r = find_max_batch_size(t, budget=2**20)
            assert r.batch_size > 32
            after = t.state_dict()
            assert all(torch.equal(a, b) for a, b in zip(state["model"].values(), after["model"].values()))
            for i, s in state["optimizer"]["state"].items():
                assert all(torch.equal(s[k], after["optimizer"]["state"][i][k]) for k in s)
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, t.model.parameters()))
            assert t.optimizer.param_groups[0]["lr"] == lr
            assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
            assert t.model.training
        t.fit(steps=5)
        runs.append(t)
    assert same_weights(runs[0].model, runs[1].model)
    assert runs[0].history.steps["loss"] == runs[1].history.steps["loss"]


def test_finder_and_measure_take_datasets_and_loaders():
    from torch.utils.data import DataLoader, TensorDataset
    x, y = data(64)
    model = MLP(40, (32,), 10)
    ref = find_max_batch_size(model, (x, y), budget=300_000, margin=0).batch_size
    ds = TensorDataset(x, y)

    class Pairs(torch.utils.data.Dataset):   # a map-style Dataset that is not in memory as tensors
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return x[i], y[i]

    for source in (ds, DataLoader(ds, batch_size=16), Pairs()):
        assert find_max_batch_size(model, source, budget=300_000, margin=0).batch_size == ref
    for source in (DataLoader(ds, batch_size=16), Pairs()):   # a trainer holding no tensors: its data is sampled
        t = Trainer(copy.deepcopy(model), source, batch_size=16)
        assert t.training_tensors() is None and t.training_data is source
        assert find_max_batch_size(t, budget=300_000, margin=0).batch_size == ref
    t = Trainer(copy.deepcopy(model), ds, batch_size=16)
    held = t.training_tensors()
    assert torch.equal(held[0], x) and torch.equal(held[1], y)
    assert find_max_batch_size(t, budget=300_000, margin=0).batch_size == ref
    assert measure(model, Pairs(), [8], steps=0).rows[0]["total"] == accounted_total(model, x, y, 8)


def test_finder_and_measure_leave_the_rng_alone_with_a_shuffling_loader():
    from torch.utils.data import DataLoader, TensorDataset
    x, y = data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)   # its sampler draws from the RNG
    model = MLP(40, (32,), 10)
    t = Trainer(MLP(40, (32,), 10), loader)
    for run in (lambda: measure(model, loader, [8], steps=0), lambda: find_max_batch_size(model, loader, budget=300_000),
                lambda: find_max_batch_size(t, budget=300_000)):
        rng = torch.get_rng_state()
        run()
        assert torch.equal(rng, torch.get_rng_state())


def _oom_above(real, threshold, held):
    """A stand-in for a trial that runs out of memory above ``threshold`` examples, from deep
    inside a frame holding a tensor (as a real failed step holds its activations)."""
    def trial(model, x, y, cfg, **kw):
        if cfg.batch_size > threshold:
            activations = torch.zeros(16, 64)
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {cfg.batch_size} bytes")
        return real(model, x, y, cfg, **kw)
    return trial


def test_out_of_memory_is_a_failed_trial_and_its_frames_are_released(toy, monkeypatch):
    from nbbatch.memory import trials
    x, y = toy
    t = Trainer(MLP(8, (16,), 3), (x, y), batch_size=32, optimizer="adam", seed=0)
    t.fit(steps=2)
    before = copy.deepcopy(t.state_dict())
    held = []
    monkeypatch.setattr(trials, "run_trial", _oom_above(trials.run_trial, 300, held))
    # what is still alive right after the release, while the error (and its traceback) still
    # exists: the release must free the step's tensors then, before the cache is emptied
    alive_after_release = []
    real_release = trials.release_after_oom

    def release(err, device):
        real_release(err, device)
        alive_after_release.append(sum(ref() is not None for ref in held))

    monkeypatch.setattr(trials, "release_after_oom", release)
    for strategy in ("bisect", "model"):
        r = find_max_batch_size(t, budget=10**9, strategy=strategy)
        assert r.batch_size == 300
        assert any(tr.get("oom") for tr in r.trials) and all(not tr["fits"] for tr in r.trials if tr.get("oom"))
    # every failed step's tensors were released with its frames (nothing keeps them alive)
    assert held and all(ref() is None for ref in held)
    assert len(alive_after_release) == len(held) and not any(alive_after_release)
    after = t.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(before["model"].values(), after["model"].values()))
    t.fit(steps=1)   # and the trainer trains on
    report = measure(t.model, (x, y), [100, 200, 400, 800], steps=0)
    assert [r.get("oom", False) for r in report.rows] == [False, False, True]   # stops at the first OOM
    assert report.fit().per_example > 0


def test_finder_errors_before_any_change():
    x, y = data(64)
    model = MLP(40, (32,), 10)
    before = weights(model)
    with pytest.raises(ValueError, match="budget: on the CPU"):
        find_max_batch_size(model, (x, y))
    with pytest.raises(ValueError, match="model alone .* does not fit"):
        find_max_batch_size(model, (x, y), budget=10_000)
    with pytest.raises(ValueError, match="not even batch size start=64"):
        find_max_batch_size(model, (x, y), budget=20_000, start=64)
    with pytest.raises(ValueError, match="margin"):
        find_max_batch_size(model, (x, y), budget=10**6, margin=1)
    with pytest.raises(ValueError, match="round_to"):
        find_max_batch_size(model, (x, y), budget=10**6, round_to=3)
    with pytest.raises(ValueError, match="strategy"):
        find_max_batch_size(model, (x, y), budget=10**6, strategy="halving")
    with pytest.raises(ValueError, match="precision='fp16'"):
        find_max_batch_size(model, (x, y), budget=10**6, precision="fp16")
    with pytest.raises(ValueError, match="data"):
        find_max_batch_size(model, budget=10**6)
    with pytest.raises(TypeError, match="target"):
        find_max_batch_size("model", (x, y), budget=10**6)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))

    class Watched(MLP):   # records moves to a device (a CUDA model would leave the CPU there)
        def to(self, *args, **kwargs):
            moves.append(args)
            return super().to(*args, **kwargs)

    moves = []
    for bad in (-1, 0, float("nan"), "1 GiB"):
        with pytest.raises(ValueError, match="budget"):
            find_max_batch_size(Watched(40, (32,), 10), (x, y), budget=bad)
    assert moves == []


# ---------------------------------------------------------------------------- throughput knee
def test_knee_of_known_curves():
    bs = [1, 2, 4, 8, 16, 32, 64]
    assert find_knee(bs, [min(b, 16) * 10.0 for b in bs]) == 16         # perfect scaling, then flat
    assert find_knee(bs, [10.0 * b for b in bs]) == 64                  # never saturates
    assert find_knee(bs, [100.0] * 7) == 1                              # saturated from the start
    assert find_knee(bs, [b * 10.0 * 0.95 ** i for i, b in enumerate(bs)]) == 64   # 1.9x per doubling
    assert find_knee(bs, [b * 10.0 * 0.85 ** i for i, b in enumerate(bs)]) == 1    # 1.7x per doubling
    assert find_knee([8, 32, 64], [80.0, 300.0, 400.0]) == 32           # 3.75x for 4x > 1.8^2
    with pytest.raises(ValueError, match="increasing"):
        find_knee([4, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="min_gain"):
        find_knee([1, 2], [1.0, 2.0], min_gain=2.5)
    with pytest.raises(ValueError, match="examples_per_s"):
        find_knee([1, 2], [1.0])


def test_step_time_fit_and_its_knee():
    bs = [1, 2, 4, 8, 16, 32, 64, 128]
    t0, c = 2e-3, 5e-5
    fit = fit_step_time(bs, [t0 + c * b for b in bs])
    assert fit["overhead"] == pytest.approx(t0) and fit["per_example"] == pytest.approx(c)
    assert fit["knee"] == pytest.approx(t0 / (8 * c))     # 5: doubling 5 -> 10 gives exactly 1.8x
    B = fit["knee"]
    assert 2 * (t0 + c * B) / (t0 + 2 * c * B) == pytest.approx(1.8)
    # on the same exact curve the doubling walk reaches 8 (4 -> 8 gives 1.83x) and stops (8 -> 16: 1.71x)
    assert find_knee(bs, [b / (t0 + c * b) for b in bs]) == 8
    assert fit_step_time([1, 2], [1.0, 1.0])["knee"] == math.inf
    with pytest.raises(ValueError, match="min_gain"):
        fit_step_time(bs, [1.0] * 8, min_gain=1)


def test_measured_throughput_has_a_knee():
    x, y = data(128)
    report = measure(MLP(40, (32,), 10), (x, y), [1, 4, 16, 64], steps=2)
    assert report.knee() in report.batch_sizes
    assert report.knee(method="fit") in report.batch_sizes
    with pytest.raises(ValueError, match="method"):
        report.knee(method="elbow")


# ---------------------------------------------------------------------------- compare
def test_compare_configurations_side_by_side():
    x, y = data(128)
    c = compare_configs(MLP(40, (64, 64, 64), 10), (x, y),
                {"plain": {}, "accumulate 4": {"accumulate": 4}, "checkpoint": {"checkpoint_segments": 2},
                 "adam": {"optimizer": "adam"}}, 128, steps=1)
    rows = {r["config"]: r for r in c.rows}
    assert rows["plain"]["memory_ratio"] == 1.0 and rows["plain"]["time_ratio"] == 1.0
    assert rows["accumulate 4"]["saved"] < rows["plain"]["saved"]
    assert rows["checkpoint"]["total"] < rows["plain"]["total"]
    assert rows["adam"]["optimizer"] == 2 * rows["adam"]["params"] + 8 * F32
    assert rows["adam"]["saved"] == rows["plain"]["saved"]
    assert len(c.to_pandas()) == 4
    with pytest.raises(ValueError, match="configs"):
        compare_configs(MLP(40, (8,), 10), (x, y), {}, 32)
    with pytest.raises(ValueError, match="precision"):
        compare_configs(MLP(40, (8,), 10), (x, y), {"a": {}, "b": {"precision": "fp16"}}, 32, device="cpu")


def test_compare_reports_a_configuration_that_runs_out_of_memory():
    x, y = data(128)
    # a batch of 32 runs out of memory, micro-batches of 8 do not
    c = compare_configs(HugeAbove(16), (x, y), {"plain": {}, "accumulate 4": {"accumulate": 4}}, 32, steps=1)
    plain, acc = c.rows
    assert plain["oom"] and plain["config"] == "plain" and plain["memory_ratio"] is None
    assert acc["total"] > 0 and acc["memory_ratio"] is None and acc["config"] == "accumulate 4"
    assert "plain: OOM" in repr(c) and "accumulate 4:" in repr(c)
    c.plot()


# ---------------------------------------------------------------------------- planner
def test_plan_numbers_and_trainer_from_plan(toy):
    m = MemoryModel.fit([8, 16], [10_000 + 8 * 500, 10_000 + 16 * 500])
    p = plan(200, budget=10_000 + 48 * 500, memory=m, lr=0.05, base_batch_size=50)
    assert (p.max_micro_batch, p.accumulate, p.micro_batch) == (48, 5, 40)
    assert p.peak_lr == pytest.approx(0.2) and p.lr == 0.05 and p.warmup_epochs == 5.0
    assert p.predicted_bytes == pytest.approx(10_000 + 40 * 500)
    assert "effective batch 200 = 1 device(s) x 5 micro-batch(es) of 40" in p.summary()
    x, y = toy
    t = Trainer.from_plan(MLP(8, (16,), 3), (x, y), p, optimizer="momentum", seed=0)
    assert (t.config.batch_size, t.config.accumulate) == (200, 5)
    assert t.peak_lr == pytest.approx(0.2)
    t.fit(epochs=6)                                          # one step per epoch: 5 of warm-up
    assert t.history.steps["lr"][0] == pytest.approx(0.05)   # warm-up starts from the base lr (Goyal)
    assert t.history.steps["lr"][-1] == pytest.approx(0.2)
    sqrt = plan(200, lr=0.05, base_batch_size=50, scale_rule="sqrt", world_size=4)
    assert (sqrt.per_device_batch, sqrt.accumulate, sqrt.micro_batch) == (50, 1, 50)
    assert sqrt.peak_lr == pytest.approx(0.1) and sqrt.base_batch_size == 50
    assert sqrt.to_config().batch_size == 50
    assert plan(64, lr=0.1).warmup_epochs == 0.0


def test_plan_errors():
    m = MemoryModel.fit([8, 16], [10_000 + 8 * 500, 10_000 + 16 * 500])
    with pytest.raises(ValueError, match="model alone .* does not fit"):
        plan(64, budget=5_000, memory=m)
    with pytest.raises(ValueError, match="world_size"):
        plan(65, world_size=2)
    with pytest.raises(ValueError, match="memory"):
        plan(64, budget=10**6)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        plan(0)
    with pytest.raises(TypeError, match="memory"):
        plan(64, budget=10**6, memory={"fixed": 1})
    x, y = data(64)
    report = measure(MLP(40, (16,), 10), (x, y), [8, 16], steps=0)
    assert plan(256, budget=60_000, memory=report).max_micro_batch == report.fit().max_batch_size(60_000)
    with pytest.raises(ValueError, match="scale_rule='cubic' is not known"):
        plan(64, scale_rule="cubic")
    with pytest.raises(TypeError, match="plan"):
        Trainer.from_plan(MLP(8, (4,), 3), data(32, 8, 3), {"batch_size": 8})


# ---------------------------------------------------------------------------- CUDA (skipped without a device)
def _cuda_data(n=512, d=256, classes=10):
    x, y = data(n, d, classes)
    return x.cuda(), y.cuda()


@requires_cuda
def test_cuda_prediction_within_10_percent_beyond_the_fitted_range():
    x, y = _cuda_data()
    model = MLP(256, (1024, 1024, 1024), 10)
    fit = measure(model, (x, y), [256, 512, 1024], steps=0, device="cuda", precision="fp32").fit()
    far = measure(model, (x, y), [2048, 4096], steps=0, device="cuda", precision="fp32")
    for row in far.rows:
        assert row["method"] == "allocator"
        assert abs(fit.predict(row["batch_size"]) - row["total"]) <= 0.10 * row["total"]


@requires_cuda
def test_cuda_finder_within_5_percent_of_exhaustive_search():
    x, y = _cuda_data()
    model = MLP(256, (1024, 1024), 10).cuda()
    budget = 256 * 2**20
    r = find_max_batch_size(model, (x, y), budget=budget, margin=0, device="cuda", precision="fp32")
    B = r.batch_size
    totals = measure(model, (x, y), [B, math.ceil(1.05 * B)], steps=0, device="cuda", precision="fp32").rows
    assert totals[0]["total"] <= budget < totals[1]["total"]


@requires_cuda
def test_cuda_memory_back_to_baseline_after_out_of_memory():
    model = MLP(256, (4096, 4096), 10).cuda()
    x, y = _cuda_data()
    # one step first: cuBLAS keeps its workspace in the caching allocator from the first matmul on
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    before = weights(model)
    free = torch.cuda.mem_get_info()[0]
    # a budget above the free memory: the growth phase runs into a real out-of-memory error
    r = find_max_batch_size(model, (x, y), budget=2 * free, margin=0, limit=2**24, device="cuda", precision="fp32")
    assert any(t.get("oom") for t in r.trials)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
