"""Batch-size schedules: the BatchSchedule, the batch sources that follow it, and the Trainer's
counting, epochs and checkpoints across a change of batch size."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import PairDataset, make_mlp, same_weights
from nbbatch import MultiRun, TrainConfig, Trainer
from nbbatch.batching import DatasetBatches, TensorBatches, epoch_permutation
from nbbatch.schedules import BatchSchedule, decay_factor

DETERMINISTIC = ("step", "epoch", "examples", "loss", "lr", "batch_size")
SCHEDULE = {"epochs": [1, 2], "factor": 3}   # batch 8 -> 24 -> 72 on 100 examples
OPTS = dict(batch_size=8, lr=0.05, optimizer="momentum", seed=3, batch_schedule=SCHEDULE)


def det_columns(history):
    return {c: history.steps[c] for c in DETERMINISTIC}


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)
    return x, y


class Recorder(nn.Module):
    """A linear model whose single input feature is the example's index; records the training batches."""

    def __init__(self, classes=3):
        super().__init__()
        self.linear = nn.Linear(1, classes)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0].round().long().tolist())
        return self.linear(x)


def indexed(n=100):
    return torch.arange(n).float()[:, None], torch.arange(n) % 3


# ---------------------------------------------------------------------------- the pure schedule
def test_batch_schedule_table():
    s = BatchSchedule.step(10, epochs=[2, 5], factor=4)
    assert [s(e) for e in range(7)] == [10, 10, 40, 40, 40, 160, 160]
    assert s.sizes == (10, 40, 160) and s.milestones == ((2, 40), (5, 160))
    # steps per epoch of 1000 examples, with and without the short last batch
    assert [s.epoch_steps(e, 1000) for e in (0, 2, 5)] == [100, 25, 7]
    assert [s.epoch_steps(e, 1000, drop_last=True) for e in (0, 2, 5)] == [100, 25, 6]
    assert s.steps(7, 1000) == 2 * 100 + 3 * 25 + 2 * 7
    assert s.steps(2.5, 1000) == 200 + round(0.5 * 25)
    assert s.steps(0, 1000) == 0
    pairs = BatchSchedule.from_spec([(2, 40), (5, 160)], 10)
    assert pairs == s == BatchSchedule.from_spec({"epochs": [2, 5], "factor": 4}, 10)
    assert BatchSchedule.from_spec(s, 10) is s
    assert BatchSchedule.from_spec(s.to_spec(), 10) == s


def test_batch_increase_matches_lr_step_decay_and_takes_fewer_updates():
    """Multiplying B by k where step decay divides lr by k shrinks lr/B alike, with fewer steps."""
    s = BatchSchedule.step(16, epochs=[3, 6], factor=5)
    for epoch in range(9):
        lr_factor = decay_factor(epoch, "step", decay_steps=3, decay_gamma=0.2)
        assert math.isclose(s.noise_factor(epoch), lr_factor)
    n, epochs = 1000, 9
    constant = BatchSchedule(16)
    assert constant.steps(epochs, n) == 9 * 63
    assert s.steps(epochs, n) == 3 * 63 + 3 * 13 + 3 * 3
    assert s.steps(epochs, n) < constant.steps(epochs, n) / 2


@pytest.mark.parametrize("spec,match", [
    ("10,20", "batch_schedule must be None"),
    ({"epochs": [1, 2]}, "exactly the keys 'epochs' and 'factor'"),
    ({"epochs": [1, 2], "factor": 1}, "factor must be an int >= 2"),
    ({"epochs": [1, 2], "factor": 2.5}, "factor must be an int >= 2"),
    ({"epochs": [], "factor": 2}, "epochs is empty"),
    ({"epochs": 3, "factor": 2}, "epochs must be a list"),
    ([(2, 64), (2, 128)], "increasing order"),
    ([(0, 64)], "increasing order"),
    ([(1.5, 64)], "pair of ints"),
    ([(1, 0)], "positive int"),
    ([(1, 64, 3)], "pair of ints"),
    ([], "is empty"),
    (BatchSchedule(16, ((1, 32),)), "starts at batch size 16 but batch_size=8"),
])
def test_bad_batch_schedules_are_refused_naming_the_option(spec, match):
    with pytest.raises(ValueError, match="batch_schedule") as err:
        TrainConfig(batch_size=8, batch_schedule=spec)
    assert match in str(err.value)


def test_config_checks_against_the_scheduled_sizes_and_round_trips():
    with pytest.raises(ValueError, match="accumulate=5 .* batches of 4"):
        TrainConfig(batch_size=8, accumulate=5, batch_schedule=[(1, 4)])
    with pytest.raises(ValueError, match="decay_epochs=2 with a batch_schedule"):
        TrainConfig(batch_size=8, decay="step", decay_epochs=2, batch_schedule=SCHEDULE)
    with pytest.raises(ValueError, match="noise_scale_every=1 needs batches of >= 2"):
        TrainConfig(batch_size=8, noise_scale_every=1, batch_schedule=[(1, 1)])
    TrainConfig(batch_size=8, decay="step", decay_steps=20, batch_schedule=SCHEDULE)   # steps are fine
    for spec in (SCHEDULE, [(1, 24), (2, 72)], BatchSchedule(8, ((1, 24), (2, 72)))):
        cfg = TrainConfig(batch_size=8, batch_schedule=spec)
        back = TrainConfig.from_dict(cfg.to_dict())
        assert back.batch_schedule_value == cfg.batch_schedule_value == BatchSchedule.step(8, [1, 2], 3)
    # the factor form follows the batch size it is given with
    assert TrainConfig(batch_size=8, batch_schedule=SCHEDULE).replace(batch_size=4).batch_schedule_value(2) == 36


# ---------------------------------------------------------------------------- the batch sources
def test_sources_follow_the_schedule_from_any_example_position():
    x, y = indexed(10)
    schedule = BatchSchedule(4, ((1, 6),))
    tensors = TensorBatches(x, y, torch.device("cpu"), 4, False, seed=5, schedule=schedule)
    dataset = DatasetBatches(PairDataset(x, y), torch.device("cpu"), 4, False, seed=5, schedule=schedule)
    for src in (tensors, dataset):
        for epoch, sizes in ((0, [4, 4, 2]), (1, [6, 4]), (3, [6, 4])):
            batches = [yb.tolist() for _, yb in src.batches(epoch)]
            assert [len(b) for b in batches] == sizes
            order = epoch_permutation(10, 5, epoch)
            assert sum(batches, []) == (order % 3).tolist()
            assert [src.steps_in_epoch(epoch), src.steps_left(epoch, 4)] == [len(sizes), len(sizes) - 1]
        # from a position that is no multiple of the batch size: the rest of the epoch's order, once
        rest = [xb[:, 0].long().tolist() for xb, _ in src.batches(1, start=3)]
        assert [len(b) for b in rest] == [6, 1] and sum(rest, []) == epoch_permutation(10, 5, 1)[3:].tolist()
    dropping = TensorBatches(x, y, torch.device("cpu"), 4, True, seed=5, schedule=schedule)
    assert [len(b[1]) for b in dropping.batches(1)] == [6] and dropping.steps_in_epoch(0) == 2


# ---------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("source", ["tensors", "dataset"])
def test_each_epoch_sees_every_example_once_in_the_seeded_order(source):
    x, y = indexed(100)
    model = Recorder()
    data = (x, y) if source == "tensors" else PairDataset(x, y)
    t = Trainer(model, data, batch_size=8, lr=0.05, seed=3, batch_schedule=SCHEDULE)
    assert [t.steps_per_epoch, t.lr] == [13, 0.05]
    t.fit(epochs=3)
    schedule = BatchSchedule.step(8, [1, 2], 3)
    sizes = [len(b) for b in model.seen]
    assert sizes == [8] * 12 + [4] + [24] * 4 + [4] + [72, 28]
    assert t.step_count == schedule.steps(3, 100) == 20
    assert t.history.steps["batch_size"] == sizes
    assert t.examples_seen == sum(sizes) == 300 == t.history.steps["examples"][-1]
    assert (t.epoch, t.batch_in_epoch, t.example_in_epoch) == (3, 0, 0)
    bounds = [0, 13, 18, 20]
    for epoch in range(3):
        seen = sum(model.seen[bounds[epoch]:bounds[epoch + 1]], [])
        assert seen == epoch_permutation(100, 3, epoch).tolist()
    # the epoch column counts each epoch's own steps: it reaches each whole epoch exactly
    epochs = t.history.steps["epoch"]
    assert [epochs[i - 1] for i in bounds[1:]] == [1.0, 2.0, 3.0]
    assert math.isclose(epochs[14], 1 + 2 / 5)


def test_fit_epochs_counts_each_epochs_own_steps_from_anywhere(data):
    t = Trainer(make_mlp(), data, **OPTS)
    t.fit(epochs=0.5)   # half of epoch 0's 13 steps
    assert t.step_count == round(6.5)
    t.fit(epochs=1)     # to the same share of epoch 1 (5 steps)
    assert (t.epoch, t.step_count) == (1, 13 + 2)
    t.fit(steps=3)
    assert (t.epoch, t.batch_in_epoch, t.steps_per_epoch) == (2, 0, 2)
    t.fit(epochs=3)     # epochs at the largest batch
    assert t.step_count == 18 + 3 * 2 and t.examples_seen == 500


def test_warmup_epochs_and_total_epochs_follow_the_schedule(data):
    t = Trainer(make_mlp(), data, **OPTS, warmup="linear", warmup_epochs=1, decay="cosine", total_epochs=3)
    schedule = t._get_schedule(20)   # horizon: the 20 steps of the 3 epochs
    assert (schedule.warmup_steps, schedule.total_steps) == (13, 20)


def test_batch_increase_takes_fewer_updates_than_lr_decay_for_the_same_examples(data):
    """The trainers' counts: lr step decay at epochs 1, 2 (gamma 1/3) vs the batch growing by 3 there."""
    decay = Trainer(make_mlp(), data, batch_size=8, lr=0.05, optimizer="momentum", seed=3, decay="step",
                    decay_steps=13, decay_gamma=1 / 3)
    grow = Trainer(make_mlp(), data, **OPTS)
    decay.fit(epochs=3)
    grow.fit(epochs=3)
    assert decay.examples_seen == grow.examples_seen == 300
    assert (decay.step_count, grow.step_count) == (39, 20)
    lr_at_epoch = [decay.history.steps["lr"][13 * e] for e in range(3)]
    b_at_epoch = [grow.history.steps["batch_size"][i] for i in (0, 13, 18)]
    for lr, b in zip(lr_at_epoch, b_at_epoch):
        assert math.isclose(lr / 0.05, 8 / b)   # the same lr/B at every epoch
    assert set(grow.history.steps["lr"]) == {0.05}


@pytest.mark.parametrize("stop_at", [5, 13, 14, 18, 19], ids=["before", "at", "after", "at-2", "after-2"])
def test_resume_is_exact_across_a_change_of_batch_size(data, tmp_path, stop_at):
    opts = dict(OPTS, optimizer="momentum")
    full = Trainer(make_mlp(dropout=0.2), data, **opts)
    full.fit(epochs=3)
    t = Trainer(make_mlp(dropout=0.2), data, **opts)
    t.add_callback("step_end", lambda tr, row: (tr.save(tmp_path / "r.pt"), tr.request_stop())
                   if row["step"] == stop_at else None)
    t.fit(epochs=3)
    assert t.step_count == stop_at
    back = Trainer.load(tmp_path / "r.pt", make_mlp(seed=8, dropout=0.2), data)
    assert (back.epoch, back.batch_in_epoch, back.example_in_epoch) == (t.epoch, t.batch_in_epoch, t.example_in_epoch)
    back.fit()
    assert back.step_count == 20 and back.examples_seen == 300
    assert same_weights(back.model, full.model)
    assert det_columns(back.history) == det_columns(full.history)
    # the in-memory state dict resumes the same way
    again = Trainer(make_mlp(seed=9, dropout=0.2), data, **opts)
    again.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    again.fit()
    assert same_weights(again.model, full.model)


def test_a_checkpoint_resumes_at_its_example_under_another_batch_size(tmp_path):
    """A run stopped mid-epoch at batch 8, continued at batch 12: the epoch is still covered once."""
    x, y = indexed(100)
    t = Trainer(Recorder(), (x, y), batch_size=8, lr=0.05, seed=3)
    t.fit(steps=3)
    t.save(tmp_path / "r.pt")
    model = Recorder()
    back = Trainer.load(tmp_path / "r.pt", model, (x, y), batch_size=12)
    assert (back.epoch, back.example_in_epoch, back.batch_in_epoch, back.steps_per_epoch) == (0, 24, 2, 9)
    back.fit(steps=7)   # 76 examples left: 6 batches of 12 and one of 4
    assert [len(b) for b in model.seen] == [12] * 6 + [4]
    assert sum(t.model.seen, []) + sum(model.seen, []) == epoch_permutation(100, 3, 0).tolist()
    assert (back.epoch, back.examples_seen) == (1, 100)


def test_a_damaged_position_is_refused(data):
    t = Trainer(make_mlp(), data, **OPTS)
    t.fit(steps=14)
    state = t.state_dict()
    state["progress"] = dict(state["progress"], example_in_epoch=100)
    fresh = Trainer(make_mlp(), data, **OPTS)
    with pytest.raises(ValueError, match="example_in_epoch=100 but epoch 1 of this trainer has 5 batches"):
        fresh.load_state_dict(state)
    assert fresh.step_count == 0


def test_trainer_refuses_schedules_the_data_cannot_follow(data):
    x, y = data
    with pytest.raises(ValueError, match="batch_schedule=.*DataLoader's batches"):
        Trainer(make_mlp(), DataLoader(TensorDataset(x, y), batch_size=8), batch_schedule=SCHEDULE)
    with pytest.raises(ValueError, match="reaches a batch of 128, larger than the training set \\(100"):
        Trainer(make_mlp(), data, batch_size=8, batch_schedule=[(1, 128)])
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    # 100 = 3 * 33 + 1: at batch 33 the last batch holds one example, which batch norm cannot normalise
    with pytest.raises(ValueError, match="batch_schedule: batch_size=33: the last batch"):
        Trainer(bn, data, batch_size=10, batch_schedule=[(1, 33)])
    Trainer(bn, data, batch_size=10, batch_schedule=[(1, 33)], drop_last=True)


def test_multirun_refuses_a_batch_schedule(data):
    with pytest.raises(ValueError, match="batch_schedule=.* is not offered by MultiRun"):
        MultiRun(lambda: make_mlp(), data, seed=[0, 1], device="cpu", batch_schedule=SCHEDULE)
