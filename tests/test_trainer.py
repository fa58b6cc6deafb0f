import copy
import functools
import os
import pickle
import signal
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import PairDataset, make_mlp, requires_cuda, same_weights, weights
from nbbatch import DivergenceError, Schedule, TrainConfig, Trainer
from nbbatch.batching import epoch_permutation

DETERMINISTIC = ("step", "epoch", "examples", "loss", "lr", "batch_size")


def det_columns(history):
    return {c: history.steps[c] for c in DETERMINISTIC}


# ---------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("n,batch,k", [(64, 16, 4), (64, 16, 3), (50, 16, 3), (37, 37, 5)])
def test_accumulation_equals_one_big_batch(toy, n, batch, k):
    """K micro-batches give the update of one batch of the same examples (uneven splits too)."""
    x, y = toy[0][:n], toy[1][:n]
    runs = []
    for acc in (1, k):
        model = make_mlp()
        t = Trainer(model, (x, y), batch_size=batch, lr=0.1, optimizer="momentum", accumulate=acc, seed=3)
        t.fit(epochs=2)
        runs.append((model, t.history))
    (m1, h1), (mk, hk) = runs
    for a, b in zip(weights(m1), weights(mk)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(h1.steps["loss"]), torch.tensor(hk.steps["loss"]), rtol=1e-5, atol=1e-6)
    assert h1.steps["batch_size"] == hk.steps["batch_size"]
    if n % batch:
        assert h1.steps["batch_size"][-1] == n % batch   # the uneven last batch of each epoch


def test_one_step_matches_hand_computed_sgd(toy):
    x, y = toy
    model = make_mlp()
    ref = copy.deepcopy(model)
    t = Trainer(model, (x, y), batch_size=32, lr=0.3, optimizer="sgd", accumulate=4, seed=5)
    t.step()
    idx = epoch_permutation(len(x), 5, 0)[:32]
    loss = F.cross_entropy(ref(x[idx]), y[idx])
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, p0, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.3 * g, rtol=1e-5, atol=1e-7)
    assert t.history.steps["loss"][0] == pytest.approx(loss.item(), rel=1e-5)


# ---------------------------------------------------------------------------- reproducibility and resume
def test_seeded_runs_are_bitwise_reproducible(toy):
    runs = []
    for _ in range(2):
        model = make_mlp(dropout=0.2)
        t = Trainer(model, toy, batch_size=16, lr=0.05, optimizer="adam", seed=11)
        t.fit(epochs=2)
        runs.append((model, det_columns(t.history)))
    assert same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
@pytest.mark.parametrize("stop_at", [7, 26, 38])
def test_resume_from_midrun_checkpoint_is_bitwise_identical(toy, tmp_path, optimizer, stop_at):
    x, y = toy
    evx, evy = x[:50], y[:50]
    opts = dict(batch_size=16, lr=0.05, optimizer=optimizer, seed=2, warmup="linear", warmup_steps=10,
                decay="cosine", eval_every=9)

    full_model = make_mlp(dropout=0.1)
    full = Trainer(full_model, (x, y), eval_data=(evx, evy), **opts)
    full.fit(epochs=3)                                       # 13 steps per epoch -> 39 steps

    model = make_mlp(dropout=0.1)
    t = Trainer(model, (x, y), eval_data=(evx, evy), **opts)
    path = tmp_path / "run.pt"

    def save_and_stop(trainer, row):
        if row["step"] == stop_at:
            trainer.save(path)
            trainer.request_stop()

    t.add_callback("step_end", save_and_stop)
    t.fit(epochs=3)
    assert t.step_count == stop_at

    resumed = Trainer.load(path, make_mlp(seed=99, dropout=0.1), (x, y), eval_data=(evx, evy))
    assert resumed.step_count == stop_at
    resumed.fit()                                             # continue the stopped fit to its end
    assert resumed.step_count == full.step_count == 39
    assert same_weights(resumed.model, full_model)
    assert det_columns(resumed.history) == det_columns(full.history)
    assert resumed.history.evals["eval_loss"] == full.history.evals["eval_loss"]
    assert resumed.history.evals["step"] == full.history.evals["step"]


def test_state_dict_round_trip_in_memory(toy):
    model = make_mlp()
    t = Trainer(model, toy, batch_size=20, lr=0.1, optimizer="nesterov", seed=1)
    t.fit(steps=5)
    state = copy.deepcopy(t.state_dict())   # like torch, a state_dict shares the live tensors
    t.fit(steps=5)
    after = weights(model)
    t.load_state_dict(state)
    assert t.step_count == 5 and len(t.history) == 5
    t.fit(steps=5)
    assert all(torch.equal(a, b) for a, b in zip(after, weights(model)))


def test_fit_counts_from_where_it_stands(toy):
    t = Trainer(make_mlp(), toy, batch_size=50, lr=0.1, seed=0)
    t.fit(epochs=1)
    t.fit(epochs=1)
    assert t.step_count == 8 and t.epoch == 2 and t.batch_in_epoch == 0
    t.fit(steps=3)
    assert t.step_count == 11
    assert t.history.steps["examples"][-1] == 11 * 50
    with pytest.raises(ValueError, match="nothing to continue"):
        t.fit()


# ---------------------------------------------------------------------------- stop and interrupt
def test_request_stop_from_callback_lands_after_the_current_step(toy):
    t = Trainer(make_mlp(), toy, batch_size=10, lr=0.1, seed=0)
    t.add_callback("step_end", lambda tr, row: tr.request_stop() if row["step"] == 4 else None)
    h = t.fit(epochs=5)
    assert t.step_count == 4 and len(h) == 4
    assert h.events[-1]["event"] == "stopped"


def test_stop_then_save_then_resume_records_the_same_history(toy, tmp_path):
    opts = dict(eval_data=toy, batch_size=16, lr=0.05, seed=1, eval_every=5)
    full = Trainer(make_mlp(), toy, **opts)
    full.fit(epochs=2)
    t = Trainer(make_mlp(), toy, **opts)
    t.add_callback("step_end", lambda tr, row: tr.request_stop() if row["step"] == 12 else None)
    t.fit(epochs=2)
    assert t.history.evals["step"] == [5, 10]       # no evaluation at the stop itself
    t.save(tmp_path / "s.pt")
    back = Trainer.load(tmp_path / "s.pt", make_mlp(seed=3), toy, eval_data=toy)
    back.fit()
    assert same_weights(back.model, full.model)
    assert back.history.evals.rows() == [dict(r, time=r2["time"]) for r, r2 in
                                         zip(full.history.evals.rows(), back.history.evals.rows())]
    assert det_columns(back.history) == det_columns(full.history)


def test_request_stop_from_another_thread(toy):
    t = Trainer(make_mlp(), toy, batch_size=1, lr=0.01, seed=0)
    started = threading.Event()
    seen = []

    def on_step(tr, row):
        seen.append(row["step"])
        started.set()

    t.add_callback("step_end", on_step)
    stopper = threading.Thread(target=lambda: (started.wait(10), t.request_stop()))
    stopper.start()
    t.fit(epochs=50)
    stopper.join()
    assert t.step_count < 50 * 200
    assert seen == list(range(1, t.step_count + 1))     # no lost or duplicated rows


def test_sigint_finishes_the_step_then_raises_and_resumes_exactly(toy):
    x, y = toy
    opts = dict(batch_size=16, lr=0.05, optimizer="momentum", seed=4)
    full_model = make_mlp()
    Trainer(full_model, (x, y), **opts).fit(epochs=2)

    model = make_mlp()
    t = Trainer(model, (x, y), **opts)

    def interrupt_at_5(tr, row):
        if row["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    t.add_callback("step_end", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt, match="after step 5"):
        t.fit(epochs=2)
    assert t.step_count == 5 and len(t.history) == 5
    assert t.history.events[-1]["event"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    t.remove_callback("step_end", interrupt_at_5)
    t.fit()
    assert same_weights(model, full_model)


def test_keyboard_interrupt_raised_in_a_callback_leaves_a_consistent_trainer(toy):
    t = Trainer(make_mlp(), toy, batch_size=16, lr=0.05, seed=4)

    def boom(tr, row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    t.add_callback("step_end", boom)
    with pytest.raises(KeyboardInterrupt):
        t.fit(epochs=1)
    assert t.step_count == 3 == len(t.history)
    t.remove_callback("step_end", boom)
    t.fit()
    assert t.step_count == 13


# ---------------------------------------------------------------------------- divergence
def test_nonfinite_loss_stops_and_keeps_last_finite_weights(toy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))   # no saturation: it can blow up
    t = Trainer(model, toy, batch_size=50, lr=1e4, optimizer="momentum", seed=0)
    snapshots = {}
    t.add_callback("step_end", lambda tr, row: snapshots.__setitem__(row["step"], weights(tr.model)))
    with pytest.raises(DivergenceError) as info:
        t.fit(epochs=20)
    err = info.value
    assert "lr=1e+04" in str(err) and f"step {err.step}" in str(err)
    last = t.step_count
    assert err.step == last + 1 and len(t.history) == last
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(snapshots[last], weights(model)))
    assert t.history.events[-1]["event"] == "diverged"


class _InfGrad(nn.Module):
    """Finite loss (0) but an infinite gradient at w = 0 when the flag is set."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.poison = False

    def forward(self, x):
        out = self.lin(x)
        if self.poison:
            with torch.no_grad():
                self.w.zero_()
            return out + 0 * torch.sqrt(self.w)   # d sqrt(w)/dw at 0 is inf, times 0 -> nan
        return out


def test_nonfinite_gradient_with_finite_loss_is_refused(toy):
    model = _InfGrad()
    t = Trainer(model, toy, batch_size=50, lr=0.1, seed=0)
    t.fit(steps=2)
    model.poison = True
    before = [p.detach().clone() for p in model.lin.parameters()]
    with pytest.raises(DivergenceError, match="non-finite gradient"):
        t.fit(steps=2)
    assert t.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.lin.parameters()))


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_that_would_run_code_is_refused(tmp_path, toy):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(), "progress": {}}, f, protocol=2)
    with pytest.raises(ValueError, match="not a safe nbbatch checkpoint"):
        Trainer.load(path, make_mlp(), toy)
    assert not (tmp_path / "pwned").exists()


def test_save_is_atomic(tmp_path, toy, monkeypatch):
    t = Trainer(make_mlp(), toy, batch_size=50, lr=0.1, seed=0)
    path = tmp_path / "ck.pt"
    t.save(path)
    good = path.read_bytes()
    t.fit(steps=2)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        t.save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_load_rebuilds_builtin_dataset_and_refuses_missing_callables(tmp_path):
    from nbbatch import data

    d = data.teacher_student(n_train=256, n_test=64, dim=8, num_classes=3)
    t = Trainer(make_mlp(), d, batch_size=32, lr=0.1, seed=0)
    t.fit(steps=3)
    t.save(tmp_path / "a.pt")
    back = Trainer.load(tmp_path / "a.pt", make_mlp(seed=5))
    assert back.step_count == 3 and same_weights(back.model, t.model)
    assert back.evaluate() == t.evaluate()

    t2 = Trainer(make_mlp(), d, batch_size=32, lr=0.1, optimizer=torch.optim.RMSprop)
    t2.save(tmp_path / "b.pt")
    with pytest.raises(ValueError, match="optimizer=... again"):
        Trainer.load(tmp_path / "b.pt", make_mlp())
    again = Trainer.load(tmp_path / "b.pt", make_mlp(), optimizer=torch.optim.RMSprop)
    assert isinstance(again.optimizer, torch.optim.RMSprop)


# ---------------------------------------------------------------------------- schedule, scaling, optimizers
def test_history_lr_follows_the_pure_schedule(toy):
    t = Trainer(make_mlp(), toy, batch_size=20, lr=0.1, base_batch_size=10, scale_rule="linear",
                warmup="linear", warmup_epochs=1, decay="cosine", seed=0)
    t.fit(epochs=3)
    expected = Schedule(0.2, warmup="linear", warmup_steps=10, warmup_start=0.5, decay="cosine", total_steps=30)
    assert t.history.steps["lr"] == pytest.approx(expected.values(30))
    assert t.history.steps["lr"][0] == pytest.approx(0.1)   # Goyal: start from the unscaled lr
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(expected(29))


def test_step_decay_in_epochs_and_sqrt_scaling(toy):
    t = Trainer(make_mlp(), toy, batch_size=40, lr=0.1, base_batch_size=10, scale_rule="sqrt",
                decay="step", decay_epochs=2, decay_gamma=0.5, seed=0)
    t.fit(epochs=5)
    lrs = t.history.steps["lr"]
    assert lrs[:10] == pytest.approx([0.2] * 10) and lrs[10:20] == pytest.approx([0.1] * 10)
    assert lrs[20:] == pytest.approx([0.05] * 5)


@pytest.mark.parametrize("name,cls,extra", [
    ("sgd", torch.optim.SGD, {"momentum": 0.0, "nesterov": False}),
    ("momentum", torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    ("nesterov", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("adam", torch.optim.Adam, {"betas": (0.9, 0.999)}),
    ("adamw", torch.optim.AdamW, {"weight_decay": 0.01}),
])
def test_optimizers_by_name(toy, name, cls, extra):
    wd = extra.get("weight_decay", 0.0)
    t = Trainer(make_mlp(), toy, optimizer=name, weight_decay=wd)
    assert type(t.optimizer) is cls
    group = t.optimizer.param_groups[0]
    for key, value in extra.items():
        assert group[key] == value


def test_optimizer_factories(toy):
    t = Trainer(make_mlp(), toy, optimizer=functools.partial(torch.optim.RMSprop, alpha=0.5), lr=0.01)
    assert isinstance(t.optimizer, torch.optim.RMSprop) and t.optimizer.param_groups[0]["alpha"] == 0.5
    t.fit(steps=2)
    model = make_mlp()
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        Trainer(model, toy, optimizer=lambda params, lr: "nope", seed=5)
    assert torch.equal(torch.get_rng_state(), rng)      # failed before seeding anything
    with pytest.raises(TypeError, match=r"accept \(params, lr=...\)"):
        Trainer(make_mlp(), toy, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def test_clipping_bounds_the_update(toy):
    x, y = toy
    model = make_mlp()
    ref = copy.deepcopy(model)
    t = Trainer(model, (x * 100, y), batch_size=200, lr=1.0, optimizer="sgd", clip_grad_norm=0.01)
    t.step()
    delta = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), ref.parameters())))
    assert delta.item() == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------------------- until, evaluation, events
def test_until_eval_metric_stops_at_target(toy):
    x, y = toy
    t = Trainer(make_mlp(), (x, y), eval_data=(x, y), batch_size=20, lr=0.5, optimizer="momentum", seed=0)
    h = t.fit(until=("eval_accuracy", 0.9))
    assert h.target["reached"] and h.evals["eval_accuracy"][-1] >= 0.9
    assert all(a < 0.9 for a in h.evals["eval_accuracy"][:-1])
    assert h.events[-1]["event"] == "target"


def test_until_unreachable_is_reported_not_raised(toy):
    t = Trainer(make_mlp(), toy, eval_data=toy, batch_size=100, lr=0.01, seed=0)
    h = t.fit(steps=4, until="eval_loss<=0.0001")
    assert t.step_count == 4 and h.target == {"metric": "eval_loss", "value": 0.0001, "mode": "min",
                                              "reached": False, "step": None}


def test_evaluate_matches_a_manual_pass_and_restores_mode(toy):
    x, y = toy
    model = make_mlp(dropout=0.5)
    t = Trainer(model, (x, y), eval_data=(x, y), eval_batch_size=7)
    model.train()
    result = t.evaluate()
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert result["loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert result["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert t.evaluate("train") == pytest.approx(result)
    assert t.evaluate(TensorDataset(x, y)) == pytest.approx(result)
    with pytest.raises(ValueError, match="data='test' is not known"):
        t.evaluate("test")


def test_events_fire_in_order(toy):
    t = Trainer(make_mlp(), toy, eval_data=toy, batch_size=50, lr=0.1)
    log = []
    for event in ("fit_start", "step_end", "eval_end", "fit_end"):
        t.add_callback(event, lambda tr, row, e=event: log.append(e))
    t.fit(epochs=2)
    # an evaluation step records its evaluation before its step_end callbacks run
    assert log == ["fit_start"] + (["step_end"] * 3 + ["eval_end", "step_end"]) * 2 + ["fit_end"]
    with pytest.raises(ValueError, match="event='step'"):
        t.add_callback("step", print)


def test_mse_regression_and_custom_metrics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    mae = lambda out, target: (out.squeeze(-1) - target).abs().mean()  # noqa: E731
    t = Trainer(model, (x, y), eval_data=(x, y), loss="mse", metrics={"mae": mae}, batch_size=32, lr=0.1)
    h = t.fit(epochs=20)
    assert h.evals["eval_loss"][-1] < 1e-4 and h.evals["eval_mae"][-1] < 1e-2
    assert "eval_accuracy" not in h.evals


# ---------------------------------------------------------------------------- data path


def test_dataset_and_tensor_paths_give_identical_runs(toy):
    x, y = toy
    runs, evals = [], []
    for data in ((x, y), TensorDataset(x, y), PairDataset(x, y)):
        model = make_mlp()
        t = Trainer(model, data, batch_size=32, lr=0.1, seed=7)
        t.fit(epochs=2)
        runs.append(model)
        evals.append(t.evaluate("train"))
    assert same_weights(runs[0], runs[1]) and same_weights(runs[0], runs[2])
    assert evals[1] == pytest.approx(evals[0]) and evals[2] == pytest.approx(evals[0])
    assert Trainer(make_mlp(), TensorDataset(x, y))._train.kind == "tensors"
    assert Trainer(make_mlp(), PairDataset(x, y))._train.kind == "dataset"


def test_dataloader_is_used_as_given(toy):
    loader = DataLoader(TensorDataset(*toy), batch_size=25, shuffle=False)
    t = Trainer(make_mlp(), loader, lr=0.1)
    assert t.config.batch_size == 25 and t.steps_per_epoch == 8
    t.fit(epochs=1)
    assert t.history.steps["batch_size"] == [25] * 8
    with pytest.raises(ValueError, match="batch_size=10 differs"):
        Trainer(make_mlp(), loader, batch_size=10)


def test_data_lives_on_the_device_and_drop_last(toy):
    t = Trainer(make_mlp(), toy, batch_size=64, drop_last=True)
    assert t.training_tensors()[0].device == t.device and t.steps_per_epoch == 3
    t.fit(epochs=1)
    assert t.history.steps["batch_size"] == [64, 64, 64]
    assert Trainer(make_mlp(), toy, batch_size=64).steps_per_epoch == 4


def test_precision_bf16_on_cpu_trains():
    from nbbatch import data
    d = data.teacher_student(n_train=256, n_test=64, dim=8, num_classes=3)
    t = Trainer(make_mlp(), d, batch_size=32, lr=0.2, precision="bf16", seed=0)
    h = t.fit(epochs=3)
    assert t.precision == "bf16" and h.steps["loss"][-1] < h.steps["loss"][0]
    assert Trainer(make_mlp(), d, precision="auto", device="cpu").precision == "fp32"


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,match", [
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"batch_size": -4}, "batch_size must be a positive int, got -4"),
    ({"batch_size": 2.5}, "batch_size must be a positive int, got 2.5"),
    ({"batch_size": 201}, "batch_size=201 is larger than the training set"),
    ({"lr": -0.1}, "lr must be a finite number >= 0, got -0.1"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0, got inf"),
    ({"accumulate": 0}, "accumulate must be a positive int, got 0"),
    ({"accumulate": 65, "batch_size": 64}, "accumulate=65"),
    ({"optimizer": "lbfgs"}, "optimizer='lbfgs' is not known"),
    ({"warmup": "slow", "warmup_steps": 3}, "warmup='slow' is not known"),
    ({"warmup": "linear"}, "needs a length"),
    ({"decay": "exp"}, "decay='exp' is not known"),
    ({"precision": "fp8"}, "precision='fp8' is not known"),
    ({"precision": "fp16", "device": "cpu"}, "precision='fp16' needs a CUDA or MPS device"),
    ({"device": "tpu"}, "device='tpu' is not a known device"),
    ({"scale_rule": "cube"}, "scale_rule='cube' is not known"),
    ({"momentum": 1.5}, "momentum must lie in"),
    ({"clip_grad_norm": 0}, "clip_grad_norm must be"),
    ({"seed": "x"}, "seed must be an int"),
    ({"warmup_steps": 3, "warmup_epochs": 1}, "not both"),
    ({"nonsense": 1}, "nonsense"),
])
def test_bad_options_raise_before_any_state_changes(toy, options, match):
    model = make_mlp()
    before = weights(model)
    with pytest.raises((ValueError, TypeError), match=match):
        Trainer(model, toy, **options)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device():
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        Trainer(make_mlp(), (torch.randn(4, 8), torch.zeros(4, dtype=torch.long)), device="cuda")


def test_bad_data_is_rejected(toy):
    x, y = toy
    with pytest.raises(ValueError, match="training set is empty"):
        Trainer(make_mlp(), (x[:0], y[:0]))
    with pytest.raises(ValueError, match="200 inputs but 199 labels"):
        Trainer(make_mlp(), (x, y[:-1]))
    with pytest.raises(ValueError, match=r"labels of shape \(2, 1\)"):
        Trainer(make_mlp(), (x, y[:, None]))
    with pytest.raises(ValueError, match="labels range over"):
        Trainer(make_mlp(d_out=2), (x, y))
    with pytest.raises(ValueError, match=r"cannot take inputs of shape \(5,\)"):
        Trainer(make_mlp(), (x[:, :5], y))
    with pytest.raises(TypeError, match="data must be"):
        Trainer(make_mlp(), [1, 2, 3])


def test_bad_fit_arguments_change_nothing(toy):
    t = Trainer(make_mlp(), toy, batch_size=50, warmup="linear", warmup_steps=10, decay="cosine")
    before = weights(t.model)
    with pytest.raises(ValueError, match="warm-up \\(10 steps\\) is longer than the run \\(4 steps\\)"):
        t.fit(epochs=1)
    with pytest.raises(ValueError, match="'eval_accuracy' is not a recorded metric"):
        t.fit(epochs=3, until=("eval_accuracy", 0.5))
    with pytest.raises(ValueError, match="epochs must be a number > 0"):
        t.fit(epochs=0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        t.fit(steps=1.5)
    with pytest.raises(ValueError, match="not both"):
        t.fit(epochs=1, steps=3)
    assert t.step_count == 0 and len(t.history) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(t.model)))
    t.fit(epochs=3)          # a valid call still works afterwards, on the schedule a fresh trainer makes
    fresh = Trainer(make_mlp(), toy, batch_size=50, warmup="linear", warmup_steps=10, decay="cosine")
    fresh.fit(epochs=3)
    assert t.step_count == 12 and t.history.steps["lr"] == fresh.history.steps["lr"]


def test_config_round_trip():
    cfg = TrainConfig(batch_size=128, lr=0.2, optimizer="adamw", warmup="constant", warmup_epochs=1.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.3).lr == 0.3
    with pytest.raises(TypeError, match="unknown training option"):
        cfg.replace(learning_rate=0.3)


# ---------------------------------------------------------------------------- GPU (skipped without CUDA)
@requires_cuda
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_cuda_training_in_each_precision(toy, precision):
    t = Trainer(make_mlp(), toy, batch_size=32, lr=0.1, device="cuda", precision=precision, seed=0)
    h = t.fit(epochs=3)
    assert t.training_tensors()[0].device.type == "cuda"
    assert h.steps["loss"][-1] < h.steps["loss"][0]
    assert h.steps["peak_memory"][-1] > 0
    if precision == "auto":
        assert t.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    if precision == "fp16":
        assert t.scaler is not None


@requires_cuda
def test_cuda_host_data_path_matches_device_resident(toy):
    runs = []
    for on_device in (True, False):
        model = make_mlp()
        Trainer(model, toy, batch_size=32, lr=0.1, device="cuda", precision="fp32", seed=0,
                data_on_device=on_device).fit(epochs=2)
        runs.append(model)
    assert same_weights(*runs)


@requires_cuda
def test_cuda_resume_matches(toy, tmp_path):
    opts = dict(batch_size=16, lr=0.05, optimizer="adam", seed=2, device="cuda", precision="fp32")
    full = make_mlp(dropout=0.1)
    Trainer(full, toy, **opts).fit(epochs=2)
    t = Trainer(make_mlp(dropout=0.1), toy, **opts)
    t.add_callback("step_end", lambda tr, row: (tr.save(tmp_path / "c.pt"), tr.request_stop()) if row["step"] == 9 else None)
    t.fit(epochs=2)
    back = Trainer.load(tmp_path / "c.pt", make_mlp(dropout=0.1), toy)
    back.fit()
    for a, b in zip(weights(back.model), weights(full)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_resume_mid_epoch_with_dataset_and_loader_sources(toy, tmp_path, kind):
    x, y = toy

    def source():
        if kind == "dataset":
            return PairDataset(x, y)
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)

    opts = dict(batch_size=16, lr=0.05, optimizer="momentum", seed=3)
    full = Trainer(make_mlp(), source(), **opts)
    full.fit(epochs=2)
    t = Trainer(make_mlp(), source(), **opts)
    t.add_callback("step_end", lambda tr, row: (tr.save(tmp_path / "r.pt"), tr.request_stop()) if row["step"] == 17 else None)
    t.fit(epochs=2)
    back = Trainer.load(tmp_path / "r.pt", make_mlp(seed=8), source())
    assert (back.epoch, back.batch_in_epoch) == (1, 4)
    back.fit()
    assert same_weights(back.model, full.model)
    assert det_columns(back.history) == det_columns(full.history)
