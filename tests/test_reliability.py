"""Reliability: failed fits, state checked before it changes, one fit at a time, exact resume,
constructor side effects, RNG rollback, clear errors, the rendezvous binding and the run log."""
import copy
import importlib.util
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import PairDataset, make_mlp, requires_cuda, same_weights, weights
from nbbatch import History, Trainer
from nbbatch.diagnostics import lr_find
from nbbatch.norms import convert_norm
from nbbatch.models import MLP

ROOT = Path(__file__).resolve().parents[1]
DETERMINISTIC = ("step", "epoch", "examples", "loss", "lr", "batch_size")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_resume", ROOT / "bench" / "bench_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make(toy, **kw):
    options = dict(eval_data=toy, batch_size=16, lr=0.1, optimizer="momentum", seed=0)
    options.update(kw)
    return Trainer(make_mlp(), toy, **options)


def columns(history):
    evals = {c: history.evals[c] for c in history.evals.columns if c != "time"}
    return {c: history.steps[c] for c in DETERMINISTIC}, evals


def clean_run(toy, **kw):
    t = make(toy, **kw)
    t.fit(epochs=2)
    return t


# ---------------------------------------------------------------------------- 1. a failed fit
def test_an_error_in_a_callback_ends_the_fit_as_failed_and_fit_continues(toy):
    ref = clean_run(toy)
    t = make(toy)
    ends = []
    t.add_callback("fit_end", lambda tr, row: ends.append(row))

    def boom(tr, row):
        if row["step"] == 5:
            raise RuntimeError("callback broke")

    t.add_callback("step_end", boom)
    with pytest.raises(RuntimeError, match="callback broke"):
        t.fit(epochs=2)
    assert t.history.events[-1]["event"] == "failed" and "callback broke" in t.history.events[-1]["detail"]
    assert isinstance(t.error, RuntimeError) and ends[-1]["reason"] == "failed" and ends[-1]["error"] is t.error
    assert t.step_count == 5
    t.remove_callback("step_end", boom)
    t.fit()                                        # continues the failed run to its planned end
    assert t.step_count == ref.step_count and same_weights(t.model, ref.model)
    assert columns(t.history) == columns(ref.history)
    assert t.error is None and t.history.events[-1]["event"] == "completed"


def test_a_metric_failing_at_an_evaluation_fails_the_fit_and_the_evaluation_is_made_on_resume(toy):
    ref = clean_run(toy)
    broken = {"now": False}

    def acc(out, y):
        if broken["now"]:
            raise ZeroDivisionError("metric broke")
        return (out.argmax(1) == y).float().mean()

    t = make(toy, metrics={"accuracy": acc})

    def break_at_12(tr, row):
        broken["now"] = row["step"] == 12

    t.add_callback("step_end", break_at_12)
    with pytest.raises(ZeroDivisionError):
        t.fit(epochs=2)
    assert t.history.events[-1]["event"] == "failed" and t.step_count == 13
    broken["now"] = False
    t.remove_callback("step_end", break_at_12)
    t.fit()
    assert same_weights(t.model, ref.model) and columns(t.history) == columns(ref.history)


def test_a_bad_label_in_a_later_batch_is_a_clear_error_and_a_failed_fit(toy):
    x, y = toy
    y = y.clone()
    y[150] = 7                                       # only the Dataset path meets it, mid-epoch
    t = Trainer(make_mlp(), PairDataset(x, y), batch_size=16, lr=0.1, seed=0)
    with pytest.raises(ValueError, match=r"labels in \[0, 7\] but the model has 3 outputs") as info:
        t.fit(epochs=1)
    assert "still at step" in str(info.value)
    assert t.history.events[-1]["event"] == "failed"
    assert len(t.history.steps) == t.step_count and t.step_count < t.steps_per_epoch


# ---------------------------------------------------------------------------- 2. load_state_dict
@pytest.mark.parametrize("damage", ["short column", "no data_seed", "history step", "momentum shape"])
def test_a_damaged_state_changes_nothing(toy, damage):
    t = make(toy)
    t.fit(steps=7)
    state = copy.deepcopy(t.state_dict())
    other = make(toy)
    other.fit(steps=3)
    before = copy.deepcopy(other.state_dict())
    if damage == "short column":
        state["history"]["steps"]["loss"].pop()
    elif damage == "no data_seed":
        del state["progress"]["data_seed"]
    elif damage == "history step":
        state["progress"]["step"] = 9
    else:
        state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["progress"] == after["progress"] and before["history"] == after["history"]
    assert torch.equal(before["optimizer"]["state"][0]["momentum_buffer"], after["optimizer"]["state"][0]["momentum_buffer"])


# ---------------------------------------------------------------------------- 3. one fit at a time
@pytest.mark.parametrize("call", ["fit", "step", "lr_find", "load_state_dict"])
def test_a_callback_cannot_start_a_second_training_call(toy, call):
    ref = clean_run(toy)
    t = make(toy)
    refused = []
    snapshot = copy.deepcopy(t.state_dict())

    def nested(tr, row):
        if row["step"] == 4:
            try:
                {"fit": lambda: tr.fit(steps=3), "step": tr.step, "lr_find": lambda: lr_find(tr, steps=5),
                 "load_state_dict": lambda: tr.load_state_dict(snapshot)}[call]()
            except RuntimeError as err:
                refused.append(str(err))

    t.add_callback("step_end", nested)
    t.fit(epochs=2)
    assert len(refused) == 1 and "already running fit()" in refused[0] and "callbacks" in refused[0]
    assert same_weights(t.model, ref.model) and columns(t.history) == columns(ref.history)


def test_a_second_fit_from_another_thread_is_refused(toy):
    ref = clean_run(toy)
    t = make(toy)
    inside, release = threading.Event(), threading.Event()

    def hold(tr, row):
        if row["step"] == 3:
            inside.set()
            release.wait(10)

    t.add_callback("step_end", hold)
    worker = threading.Thread(target=t.fit, kwargs={"epochs": 2})
    worker.start()
    assert inside.wait(10)
    try:
        from nbbatch.memory import find_max_batch_size

        for call in (lambda: t.fit(steps=2), t.step, lambda: lr_find(t, steps=5),
                     lambda: find_max_batch_size(t, budget=2**24)):
            with pytest.raises(RuntimeError, match="already running fit\\(\\) \\(in another thread\\)"):
                call()
        for call in (t.evaluate, t.state_dict, lambda: t.save(str(Path(os.devnull)))):
            with pytest.raises(RuntimeError, match="running fit\\(\\) in another thread"):
                call()
    finally:
        release.set()
        worker.join(20)
    assert same_weights(t.model, ref.model) and columns(t.history) == columns(ref.history)
    t.step()                                           # free again once the fit returned


# ---------------------------------------------------------------------------- 4. evaluation before step_end
@pytest.mark.parametrize("event", ["step_end", "eval_end"])
def test_a_checkpoint_from_a_callback_at_an_evaluation_step_resumes_exactly(toy, tmp_path, event):
    ref = clean_run(toy, eval_every=5)
    t = make(toy, eval_every=5)
    path = tmp_path / "c.pt"
    t.add_callback(event, lambda tr, row: (tr.save(path), tr.request_stop()) if row["step"] == 10 else None)
    t.fit(epochs=2)
    resumed = Trainer.load(path, make_mlp(seed=5), toy, eval_data=toy)
    assert resumed.history.evals["step"] == [5, 10]
    resumed.fit()
    assert same_weights(resumed.model, ref.model) and columns(resumed.history) == columns(ref.history)


# ---------------------------------------------------------------------------- 5. constructor side effects
class NoMove(nn.Sequential):
    def to(self, *args, **kwargs):
        raise NotImplementedError("this module cannot move")


def test_a_failed_construction_leaves_the_global_generator_alone(toy):
    model = NoMove(nn.Linear(8, 3))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="cannot be moved"):
        Trainer(model, toy, batch_size=16, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_meta_device_model_is_refused_clearly(toy):
    with torch.device("meta"):
        model = nn.Linear(8, 3)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="meta device"):
        Trainer(model, toy, batch_size=16, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_shuffling_dataloader_is_looked_at_without_drawing_from_the_global_generator(toy):
    ds = TensorDataset(*toy)
    a, b = make_mlp(), make_mlp()
    torch.manual_seed(7)
    Trainer(a, toy, batch_size=16, seed=None)          # draws its data seed only
    expected = torch.get_rng_state()
    torch.manual_seed(7)
    Trainer(b, DataLoader(ds, batch_size=16, shuffle=True), seed=None)
    assert torch.equal(torch.get_rng_state(), expected)


# ---------------------------------------------------------------------------- 6. RNG rollback
def test_an_interrupt_inside_a_step_with_dropout_resumes_bitwise(study):
    ref = study.reference()
    assert all(study.same(study.interrupted("in-step", k), ref) for k in (2, 13, 27))


@pytest.mark.parametrize("mode", ["callback", "sigint", "thread", "ckpt-same"])
def test_interrupted_runs_resume_bitwise(study, mode, tmp_path):
    ref = study.reference()
    assert all(study.same(study.interrupted(mode, k, str(tmp_path)), ref) for k in (1, 13, 26, 38))


@requires_cuda
def test_an_interrupt_inside_a_step_on_cuda_gives_back_the_cuda_generator(study):
    ref = study.reference("cuda")
    assert all(study.same(study.interrupted("in-step", k, device="cuda"), ref) for k in (2, 13, 27))


def test_a_checkpoint_resumes_bitwise_in_a_fresh_process(study, tmp_path):
    assert study.same(study.interrupted("ckpt-fresh", 13, str(tmp_path)), study.reference())


# ---------------------------------------------------------------------------- clear errors
def test_a_dtype_mismatch_is_named(toy):
    with pytest.raises(ValueError, match="parameters are torch.float64 but the inputs are torch.float32"):
        Trainer(make_mlp().double(), toy, batch_size=16)


def test_a_model_with_nothing_to_train_is_refused(toy):
    model = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        Trainer(model, toy, batch_size=16)


def test_a_non_scalar_loss_and_a_non_numeric_metric_are_refused_at_construction(toy):
    with pytest.raises(ValueError, match=r"loss: it returned a tensor of shape \(2,\)"):
        Trainer(make_mlp(), toy, batch_size=16, loss=lambda out, y: (out - out).sum(1))
    with pytest.raises(ValueError, match=r"metrics\['name'\]: it returned str"):
        Trainer(make_mlp(), toy, batch_size=16, metrics={"name": lambda out, y: "good"})


def test_unreadable_checkpoints_are_named_and_never_advise_unsafe_loading(toy, tmp_path):
    t = make(toy)
    t.fit(steps=2)
    t.save(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(os.system, protocol=2))   # would run code if unpickled
    for name in ("cut.pt", "noise.pt", "pickle.pt"):
        with pytest.raises(ValueError) as info:
            Trainer.load(tmp_path / name, make_mlp(), toy)
        assert str(tmp_path / name) in str(info.value) and "weights_only" not in str(info.value)
    state = t.state_dict()
    del state["config"]
    torch.save(state, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError, match="has no config"):
        Trainer.load(tmp_path / "noconfig.pt", make_mlp(), toy)


def test_loading_does_not_write_where_the_checkpoint_says(tmp_path, monkeypatch):
    from nbbatch import data

    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path / "mine"))
    bundle = data.mnist1d(num_samples=200)
    t = Trainer(MLP(), bundle, batch_size=32, seed=0)
    state = t.state_dict()
    elsewhere = tmp_path / "elsewhere"
    state["data_spec"] = {"name": "mnist1d", "kwargs": {**bundle.spec["kwargs"], "cache_dir": str(elsewhere)}}
    torch.save(state, tmp_path / "c.pt")
    loaded = Trainer.load(tmp_path / "c.pt", MLP())
    assert not elsewhere.exists() and loaded.step_count == 0


@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_batch_norm_that_cannot_normalise_a_batch_is_refused_before_any_step(toy, norm):
    model = MLP(8, (16,), 3, norm="batch")
    if norm == "ghost":
        model = convert_norm(model, "ghost", virtual_batch_size=8)
    x, y = toy[0][:193], toy[1][:193]                 # 12 batches of 16, then one of 1
    t = Trainer(copy.deepcopy(model), (x, y), batch_size=16, seed=0)
    before = weights(t.model)
    with pytest.raises(ValueError, match="last batch of each epoch .*drop_last=True"):
        t.fit(epochs=1)                                # refused before its first step
    assert t.step_count == 0 and same_weights_as(t.model, before)
    t.fit(steps=12)                                    # steps that stop short of the last batch run
    with pytest.raises(ValueError, match="drop_last=True"):
        t.step()
    assert t.step_count == 12
    Trainer(copy.deepcopy(model), (x, y), batch_size=16, drop_last=True).fit(epochs=1)
    with pytest.raises(ValueError, match="larger batch_size"):   # every batch: refused at construction
        Trainer(copy.deepcopy(model), (x, y), batch_size=16, accumulate=16 if norm == "batch" else 4)


def same_weights_as(model, saved):
    return all(torch.equal(p, q) for p, q in zip(weights(model), saved))


def test_lr_find_warns_when_the_range_holds_no_usable_learning_rate(toy):
    t = make(toy)
    with pytest.warns(UserWarning, match="lower start_lr"):
        lr_find(t, start_lr=1e30, end_lr=1e35, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr_find(t, steps=10)


# ---------------------------------------------------------------------------- launch binds to loopback
def _non_loopback_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))                # no packet is sent: it only picks a route
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _probe(address):
    import os as os_
    import socket as socket_

    import torch.distributed as dist

    port = int(os_.environ["MASTER_PORT"])
    reached = None
    if dist.get_rank() == 0:
        with socket_.socket(socket_.AF_INET, socket_.SOCK_STREAM) as s:
            s.settimeout(2)
            reached = s.connect_ex((address, port)) == 0
    dist.barrier()
    return reached


def test_launch_rendezvous_is_not_reachable_from_other_interfaces():
    from nbbatch.distributed import launch

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert launch(_probe, nprocs=2, args=(address,), timeout=120)[0] is False
    assert launch(_probe, nprocs=2, args=("127.0.0.1",), timeout=120)[0] is True


# ---------------------------------------------------------------------------- the run log
def test_the_run_log_holds_what_the_history_holds(toy, tmp_path):
    t = make(toy, log_dir=tmp_path / "log")

    def stop_at_9(tr, row):
        if row["step"] == 9:
            tr.request_stop()

    t.add_callback("step_end", stop_at_9)
    t.fit(epochs=2)
    t.remove_callback("step_end", stop_at_9)
    t.fit()
    logged = History.read(tmp_path / "log")
    assert columns(logged) == columns(t.history) and logged.steps["time"] == t.history.steps["time"]
    assert [e["event"] for e in logged.events] == ["stopped", "completed"]
    assert (tmp_path / "log" / "config.json").exists()


def test_the_run_log_survives_a_killed_process(tmp_path):
    log = tmp_path / "log"
    script = textwrap.dedent(f"""
        import sys, torch, torch.nn as nn
        from nbbatch import Trainer
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2000, 8, generator=g); y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        t = Trainer(model, (x, y), eval_data=(x[:200], y[:200]), batch_size=10, eval_every=50, seed=0,
                    log_dir={str(log)!r}, log_checkpoints=True)
        def slow(tr, row):
            if row["step"] == 120:
                print("ready", flush=True)
            if row["step"] >= 120:
                import time; time.sleep(0.01)
        t.add_callback("step_end", slow)
        t.fit(epochs=1000)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(3)                                   # past at least one timed flush
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = History.read(log)
    steps = logged.steps["step"]
    assert len(steps) > 150 and steps == list(range(1, len(steps) + 1))   # every row up to the last flush
    assert logged.evals["step"] == [50 * i for i in range(1, len(logged.evals) + 1)] and len(logged.evals) >= 3
    # the rows are those of the same run replayed in this process
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    torch.manual_seed(1)
    t = Trainer(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)), (x, y), batch_size=10, seed=0)
    t.fit(steps=len(steps))
    assert logged.steps["loss"] == t.history.steps["loss"]
    # the checkpoint of the last evaluation resumes that run
    resumed = Trainer.load(log / "checkpoint.pt", nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)),
                           (x, y), eval_data=(x[:200], y[:200]))
    last = resumed.step_count
    assert last % 50 == 0 and last <= len(steps) and resumed.history.steps["loss"] == logged.steps["loss"][:last]
    resumed.fit(steps=len(steps) - last + 1)
    assert resumed.history.steps["loss"][:len(steps)] == t.history.steps["loss"]


def test_a_run_resumed_into_its_own_log_directory_logs_each_row_once(toy, tmp_path):
    log = tmp_path / "log"
    t = make(toy, log_dir=log)
    t.add_callback("step_end", lambda tr, row: tr.save(tmp_path / "c.pt") if row["step"] == 9 else None)
    t.fit(epochs=1)                                    # the log runs on past the checkpoint, to step 13
    resumed = Trainer.load(tmp_path / "c.pt", make_mlp(), toy, eval_data=toy, log_dir=log)
    resumed.fit(epochs=1)
    logged = History.read(log)
    assert columns(logged) == columns(resumed.history) and logged.steps["step"] == list(range(1, 23))


@pytest.mark.parametrize("remainder", ["merge", "error"])
def test_find_max_batch_size_searches_only_batches_ghost_batch_norm_can_normalise(remainder):
    from nbbatch.memory import find_max_batch_size

    x, y = torch.randn(256, 40), torch.randint(0, 10, (256,))
    model = convert_norm(MLP(40, (64,), 10, norm="batch"), "ghost", virtual_batch_size=16, remainder=remainder)
    t = Trainer(model, (x, y), batch_size=64)
    result = find_max_batch_size(t, budget=2**20)
    sizes = [row["batch_size"] for row in result.trials]
    assert min(sizes) == 16 and len(sizes) == len(set(sizes)) and result.batch_size >= 16
    if remainder == "error":
        assert all(b % 16 == 0 for b in sizes) and result.batch_size % 16 == 0


def test_the_run_log_flushes_every_few_seconds_between_evaluations(tmp_path):
    from nbbatch.history import RunLog

    history, log = History(), RunLog(tmp_path, {"lr": 0.1}, every=0.3)
    history.steps.append({"step": 1, "loss": 1.0})
    log.write(history)                                   # too soon after the start: nothing yet
    assert len(History.read(tmp_path)) == 0
    time.sleep(0.35)
    history.steps.append({"step": 2, "loss": 0.5})
    log.write(history)
    assert History.read(tmp_path).steps["loss"] == [1.0, 0.5]
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"steps": {"step": 3, "lo')              # a write cut short by a killed process
    assert History.read(tmp_path).steps["step"] == [1, 2]
    with pytest.raises(ValueError, match="log_dir"):
        RunLog(tmp_path / "history.jsonl" / "sub")
