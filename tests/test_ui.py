"""The live controls, driven without a browser: .click() and .value drive real training."""
import random
import threading
import warnings
import time

import numpy as np
import pytest
import traitlets
import torch

pytest.importorskip("ipywidgets")

from nbbatch import DivergenceError, Trainer, data, models  # noqa: E402
from nbbatch.history import History  # noqa: E402
from nbbatch.ui import (LiveFigure, Refresher, RunComparison, RunController, TrainingPanel,  # noqa: E402
                        compare, default_builder, snapshot)
from nbbatch.ui import plots  # noqa: E402

from helpers import same_weights  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def small():
    return data.mnist1d(num_samples=1000)        # 800 train / 200 test


def make_trainer(d, seed=0, **opts):
    torch.manual_seed(seed)
    opts = {"batch_size": 32, "lr": 0.05, "optimizer": "momentum", "seed": seed, "device": "cpu", **opts}
    return Trainer(models.MLP(), d, **opts)


def wait_for(cond, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def check_history(h):
    steps = h.steps["step"]
    assert steps == list(range(1, len(steps) + 1)), "lost or duplicated step rows"
    ex = h.steps["examples"]
    assert all(b > a for a, b in zip(ex, ex[1:]))
    ev = h.evals["step"]
    assert all(b > a for a, b in zip(ev, ev[1:])), "duplicated evaluation rows"


# ---------------------------------------------------------------------- Trainer.reschedule
def test_reschedule_changes_the_next_lr_and_rejects_bad_values(small):
    t = make_trainer(small)
    t.fit(steps=3)
    t.reschedule(lr=0.01)
    assert t.lr == pytest.approx(0.01)
    t.fit(steps=1)
    assert t.history.steps["lr"] == pytest.approx([0.05] * 3 + [0.01])
    with pytest.raises(ValueError, match="batch_size"):
        t.reschedule(batch_size=64)
    with pytest.raises(ValueError, match="lr must be"):
        t.reschedule(lr=-1.0)
    with pytest.raises(ValueError, match="warm-up"):
        t.reschedule(warmup="linear", warmup_steps=10_000)
    assert t.config.warmup == "none" and t.lr == pytest.approx(0.01)   # the old schedule stays


# ---------------------------------------------------------------------- controller
def test_controller_blocking_run_equals_plain_fit(small):
    ref = make_trainer(small)
    ref.fit(epochs=2)
    t = make_trainer(small)
    c = RunController(t)
    c.start(epochs=2, block=True)
    assert c.state == "finished" and c.error is None
    assert same_weights(ref.model, t.model)
    assert t.history.steps["loss"] == ref.history.steps["loss"]
    assert t.history.evals["eval_loss"] == ref.history.evals["eval_loss"]


def test_controller_rejects_bad_input(small):
    t = make_trainer(small)
    with pytest.raises(ValueError, match="interleave"):
        RunController(t, interleave="fastest")
    with pytest.raises(TypeError, match="Trainer"):
        RunController([object()])
    with pytest.raises(ValueError, match="labels"):
        RunController(t, labels=["a", "b"])
    c = RunController(t)
    with pytest.raises(ValueError, match="epochs"):
        c.start(epochs=0)
    with pytest.raises(ValueError, match="nothing to continue"):
        c.start()
    with pytest.raises(ValueError, match="lr must be"):
        c.reschedule(lr=float("nan"))
    with pytest.raises(ValueError, match="run must be"):
        c.reschedule(run=3, lr=0.1)
    assert t.step_count == 0 and len(t.history) == 0


def test_stop_lands_within_one_step_and_resume_matches_an_uninterrupted_run(small):
    ref = make_trainer(small)
    ref.fit(epochs=3)
    t = make_trainer(small)
    c = RunController(t)
    c.start(epochs=3)
    wait_for(lambda: t.step_count >= 5)
    c.stop()
    assert c.wait(TIMEOUT)
    assert c.stop_latency[-1]["steps"] <= 1
    assert c.state == "stopped" and c.resumable and t.step_count < 3 * t.steps_per_epoch
    check_history(t.history)
    c.start(block=True)                      # continue the stopped segment to its end
    assert t.step_count == 3 * t.steps_per_epoch
    assert same_weights(ref.model, t.model)
    assert t.history.steps["loss"] == ref.history.steps["loss"]


def test_pause_holds_between_steps_and_lr_change_applies_to_the_very_next_step(small):
    t = make_trainer(small)
    c = RunController(t)
    c.start(steps=400)
    wait_for(lambda: t.step_count >= 3)
    c.pause()
    assert c.wait_paused(TIMEOUT)
    k = t.step_count
    time.sleep(0.05)
    assert t.step_count == k and c.state == "paused"
    c.reschedule(lr=0.0123)                  # queued: training is paused, not finished
    c.resume()
    wait_for(lambda: t.step_count >= k + 2)
    c.stop()
    c.wait(TIMEOUT)
    lrs = t.history.steps["lr"]
    assert lrs[k - 1] == pytest.approx(0.05) and lrs[k] == pytest.approx(0.0123)
    check_history(t.history)


def test_errors_in_the_training_thread_are_kept(small):
    t = make_trainer(small, lr=1e6, optimizer="sgd")
    c = RunController(t)
    c.start(steps=50, block=True)
    assert c.state == "error"
    assert isinstance(c.error, DivergenceError)
    assert "diverged" in c.errors[0].message() and "DivergenceError" in c.errors[0].traceback
    check_history(t.history)


def test_a_bad_checkpoint_path_is_refused_at_once_and_never_ends_the_run(small, tmp_path):
    t = make_trainer(small)
    c = RunController(t)
    with pytest.raises(TypeError, match="path must be"):
        c.checkpoint(None)
    c.start(steps=200)                   # long enough to be paused while running
    try:
        c.pause()
        assert c.wait_paused(TIMEOUT) and c.running
        with pytest.raises(TypeError, match="path must be"):
            c.checkpoint(None)                # refused here, not in the training thread
        c.checkpoint(tmp_path)                # a directory: fails between steps, kept in rejected
        c.resume()
    finally:
        assert c.wait(TIMEOUT)
    assert t.step_count == 200 and not c.errors and c.state == "finished"
    assert isinstance(c.rejected[0].error, OSError)
    check_history(t.history)


def test_interleaved_runs_take_turns_and_match_runs_alone(small):
    order = []
    ts = [make_trainer(small, batch_size=b) for b in (16, 64)]
    for i, t in enumerate(ts):
        t.add_callback("step_end", lambda tr, row, i=i: order.append(i))
    c = RunController(ts, interleave="steps")
    c.start(steps=6, block=True)
    assert order == [0, 1] * 6
    ts[0].fit(steps=2)                        # by hand, outside the controller: runs freely
    assert ts[0].step_count == 8
    for b, t, n in zip((16, 64), ts, (8, 6)):
        ref = make_trainer(small, batch_size=b)
        ref.fit(steps=6)
        if n == 8:
            ref.fit(steps=2)
        assert same_weights(ref.model, t.model)


def test_time_interleaving_finishes_every_budget(small):
    ts = [make_trainer(small, batch_size=b) for b in (8, 200)]
    c = RunController(ts, interleave="time")
    c.start(epochs=1, block=True)
    assert [t.step_count for t in ts] == [100, 4]
    assert c.state == "finished"


# ---------------------------------------------------------------------- panel
def test_headless_panel_click_trains_deterministically(small):
    build = default_builder(small, device="cpu")
    a = TrainingPanel(build=build, epochs=2, headless=True, values={"batch_size": 100, "lr": 0.1})
    b = TrainingPanel(build=build, epochs=2, headless=True, values={"batch_size": 100, "lr": 0.1})
    a.train_button.click()
    b.train_button.click()
    assert a.trainer.step_count == 16 and a.summary() == b.summary()
    ref = build(model="mlp", norm="none", batch_size=100, lr=0.1, warmup_steps=0, optimizer="momentum",
                accumulate=1, precision="auto")
    ref.fit(epochs=2)
    assert same_weights(ref.model, a.trainer.model)
    assert a.image.value[:4] == b"\x89PNG"
    assert "step <b class='nbbatch-step'>16</b>" in a.status.value
    assert a.progress.value == a.progress.max == 16


def test_panel_value_changes_drive_training(small):
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"batch_size": 200})
    p.lr_w.value = 0.02
    p.warmup_w.value = 2
    p.train_button.click()
    lrs = p.trainer.history.steps["lr"]
    assert lrs[2:] == pytest.approx([0.02] * 2) and lrs[0] < 0.02   # a 2-step linear warm-up
    first = p.trainer
    p.batch_size_w.value = 256                # a structural change: the next Train starts a new run
    p.train_button.click()
    assert p.trainer is not first and p.trainer.config.batch_size == 256 and p.runs == [first]
    assert p.trainer.step_count == 4 and first.step_count == 4 and len(first.history) == 4


def test_train_right_after_a_run_keeps_the_live_redraws_of_the_new_run(small):
    p = TrainingPanel(make_trainer(small), epochs=1, refresh=0.01)
    release = threading.Event()

    def slow_end():                           # the ended run's thread is slow to reach its final frame
        if not p.controller.active:
            release.wait(TIMEOUT)

    p.controller._listeners.insert(0, slow_end)
    try:
        p.train()
        wait_for(lambda: not p.controller.running)
        p.epochs = 50
        threading.Timer(0.2, release.set).start()
        p.train()                             # Train again before the old thread drew its final frame
        wait_for(lambda: p._refresher.final_frames >= 1)
        time.sleep(0.05)
        assert p.controller.running and p._refresher._thread is not None and p._refresher._thread.is_alive()
    finally:
        release.set()
        p.close()


def test_a_builder_returning_no_trainer_is_shown_and_keeps_the_run(small):
    build = default_builder(small, device="cpu")
    p = TrainingPanel(build=lambda **v: build(**v) if v["batch_size"] == 200 else None, epochs=1,
                      headless=True, values={"batch_size": 200})
    p.train_button.click()
    first, controller = p.trainer, p.controller
    p.batch_size_w.value = 256
    p.train_button.click()
    assert isinstance(p.error, TypeError) and "build must return" in p.message.value
    assert p.trainer is first and p.controller is controller and p.runs == []
    p.batch_size_w.value = 200
    p.train_button.click()                    # the kept run trains on
    assert first.step_count == 8 and p.controller.state == "finished"


def test_rejected_settings_are_shown_and_keep_the_run(small):
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"batch_size": 100})
    p.train_button.click()
    before = (p.trainer, p.trainer.step_count, len(p.trainer.history))
    p.batch_size_w.value = 1024               # larger than the 800 training examples
    p.train_button.click()
    assert "batch_size=1024 is larger" in str(p.error) and "1024" in p.message.value
    p.batch_size_w.value = 16
    p.accumulate_w.value = 16
    p.batch_size_w.value = 8                  # accumulate 16 would be refused: not offered, clamped, said
    assert 16 not in p.accumulate_w.options and p.accumulate_w.value == 8
    assert "accumulate set to 8" in p.message.value
    with pytest.raises(traitlets.TraitError):
        p.accumulate_w.value = 16
    assert (p.trainer, p.trainer.step_count, len(p.trainer.history)) == before
    p.batch_size_w.value, p.accumulate_w.value = 100, 1
    p.warmup_w.value = 500                    # longer than the run: refused by fit, before any step
    p.train_button.click()
    assert "warm-up" in str(p.error)
    assert (p.trainer.step_count, len(p.trainer.history)) == before[1:]
    p.warmup_w.value = 0
    p.train_button.click()
    assert p.trainer.step_count == before[1] + 8


def test_divergence_in_the_panel_is_shown_and_kept(small):
    calls = [0]

    def nan_from_step_4(out, y):              # call 1 is the Trainer's own check, 2..4 steps 1..3
        calls[0] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls[0] > 4 else loss

    p = TrainingPanel(build=lambda **v: make_trainer(small, batch_size=100, loss=nan_from_step_4),
                      epochs=1, headless=True)
    p.train_button.click()
    assert isinstance(p.error, DivergenceError)
    assert "diverged" in p.message.value and p.trainer.step_count == 3
    check_history(p.trainer.history)
    assert len(p.trainer.history) == 3


def test_live_panel_stop_pause_and_checkpoint(small, tmp_path):
    p = TrainingPanel(data=small, epochs=50, refresh=0.05, checkpoint_path=tmp_path / "run.pt",
                      values={"batch_size": 16})
    try:
        p.train_button.click()
        wait_for(lambda: p.trainer is not None and p.trainer.step_count >= 5)
        p.pause_button.click()
        assert p.controller.wait_paused(TIMEOUT) and p.pause_button.description == "Resume"
        p.checkpoint_button.click()           # queued while paused, written between steps
        k = p.trainer.step_count
        p.pause_button.click()
        wait_for(lambda: p.trainer.step_count > k + 1)
        assert (tmp_path / "run.pt").exists()
        p.stop_button.click()
        # the training thread draws the final frame when the run ends: it must say "stopped"
        wait_for(lambda: p._refresher.final_frames >= 1)
        assert "stopped" in p.status.value
        assert p.image.value[:4] == b"\x89PNG" and p._refresher.frames >= 1
        assert p.wait(TIMEOUT)
        assert p.controller.stop_latency[-1]["steps"] <= 1
        check_history(p.trainer.history)
        saved = Trainer.load(tmp_path / "run.pt", models.MLP(), small)
        assert saved.step_count == k
    finally:
        p.close()


def test_reset_while_paused_leaves_the_pause_button_ready(small):
    p = TrainingPanel(data=small, epochs=50, refresh=0.05, values={"batch_size": 16})
    try:
        p.train_button.click()
        wait_for(lambda: p.trainer is not None and p.trainer.step_count >= 2)
        p.pause_button.click()
        assert p.controller.wait_paused(TIMEOUT) and p.pause_button.description == "Resume"
        first = p.trainer
        p.reset_button.click()
        assert p.runs == [first] and p.trainer is not first
        check_history(first.history)
        assert p.pause_button.description == "Pause" and p.controller.state == "idle"
    finally:
        p.close()


def test_random_clicks_and_slider_moves_during_training(small, tmp_path):
    rng = random.Random(0)
    p = TrainingPanel(data=small, epochs=3, refresh=0.02, checkpoint_path=tmp_path / "c.pt",
                      values={"batch_size": 32})
    actions = [
        lambda: p.train_button.click(),
        lambda: p.pause_button.click(),
        lambda: p.stop_button.click(),
        lambda: p.checkpoint_button.click(),
        lambda: p.reset_button.click() if rng.random() < 0.2 else None,
        lambda: setattr(p.lr_w, "value", 10 ** rng.uniform(-3, -0.5)),
        lambda: setattr(p.warmup_w, "value", rng.choice([0, 10, 20, 500])),
        lambda: setattr(p.batch_size_w, "value", rng.choice([8, 16, 32, 64, 1024, 4096])),
        lambda: setattr(p.accumulate_w, "value", rng.choice(p.accumulate_w.options)),   # only what is offered
        lambda: setattr(p.optimizer_w, "value", rng.choice(["sgd", "momentum", "adam"])),
    ]
    try:
        p.train_button.click()
        for _ in range(300):
            rng.choice(actions)()
            time.sleep(rng.choice([0, 0, 0.001, 0.005]))
        p.stop_button.click()
        assert p.wait(TIMEOUT)
        for t in p.runs + [p.trainer]:
            check_history(t.history)
        for err in p.errors:
            assert isinstance(err, (ValueError, DivergenceError)), repr(err)
        # still resumable: Train runs more steps on the current trainer
        p.batch_size_w.value, p.accumulate_w.value, p.warmup_w.value = 32, 1, 0
        p.lr_w.value = 0.01
        p.headless = True
        n = p.trainer.step_count if p.trainer.config.batch_size == 32 else 0
        p.train_button.click()
        assert p.trainer.step_count > n
        check_history(p.trainer.history)
    finally:
        p.close()


def test_panel_records_each_training_error_once_when_threads_sync_together(small):
    from nbbatch.ui import RunError

    p = TrainingPanel(make_trainer(small), epochs=1, headless=True)
    p.controller.errors.extend(RunError(0, "B=32", ValueError(i)) for i in range(50))
    p._show = lambda *a, **k: time.sleep(0.001)     # a widget update lets other threads run
    barrier = threading.Barrier(8)

    def sync():                               # the refresh thread and widget callbacks at once
        barrier.wait()
        p._sync_controller_errors()

    threads = [threading.Thread(target=sync) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert [e.args[0] for e in p.errors] == list(range(50))


def test_panel_keeps_a_learning_rate_outside_the_default_slider_range(small):
    t = make_trainer(small, lr=5e-5)
    p = TrainingPanel(t, epochs=1, headless=True)
    p.train_button.click()
    assert t.history.steps["lr"] == pytest.approx([5e-5] * 25)     # not clamped to the slider's 1e-4
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"lr": 30.0})
    assert p.lr_w.value == 30.0
    with pytest.raises(ValueError, match=r"values\['lr'\]"):
        TrainingPanel(data=small, values={"lr": 0})


def test_panel_for_a_given_trainer_keeps_its_warm_up(small):
    for opts in ({"warmup": "linear", "warmup_epochs": 1}, {"warmup": "constant", "warmup_steps": 10}):
        ref = make_trainer(small, **opts)
        ref.fit(epochs=2)
        t = make_trainer(small, **opts)
        p = TrainingPanel(t, epochs=2, headless=True)
        p.train_button.click()
        assert t.config.warmup == opts["warmup"] and p.error is None
        assert t.history.steps["lr"] == pytest.approx(ref.history.steps["lr"])
        p.warmup_w.value = 20                 # a slider move still changes it
        assert t.config.warmup == "linear" and t.config.warmup_steps == 20


def test_panel_rejects_bad_arguments(small):
    with pytest.raises(ValueError, match="epochs"):
        TrainingPanel(data=small, epochs=0)
    with pytest.raises(ValueError, match="values"):
        TrainingPanel(data=small, values={"batchsize": 3})
    with pytest.raises(TypeError, match="trainer"):
        TrainingPanel(trainer=42)
    with pytest.raises(ValueError, match="refresh"):
        TrainingPanel(data=small, refresh=0)


def test_panel_for_a_given_trainer_fixes_structure(small):
    t = make_trainer(small, batch_size=100)
    p = TrainingPanel(t, epochs=1, headless=True)
    assert p.batch_size_w.disabled and not p.lr_w.disabled and p.batch_size_w.value == 100
    p.train_button.click()
    assert p.trainer is t and t.step_count == 8
    p.reset_button.click()
    assert "fixed" in p.message.value or "Reset" in p.message.value
    assert p.trainer is t
    t.fit(steps=3)                            # a fit by hand is not held by the panel's controller
    assert t.step_count == 11
    check_history(t.history)



def _ends_before_start_returns(controller):
    start = controller.start

    def fast_start(*args, **kwargs):       # a run so short it ends before start() returns
        start(*args, **kwargs)
        controller.wait(TIMEOUT)

    controller.start = fast_start


def test_a_run_that_ends_at_once_leaves_no_refresh_thread(small):
    p = TrainingPanel(make_trainer(small), epochs=1, refresh=0.01)
    try:
        _ends_before_start_returns(p.controller)
        p.train()
        assert p.trainer.step_count == 25 and p._refresher.final_frames == 1
        assert p._refresher._thread is None, "the live redraw thread outlives the run"
    finally:
        p.close()
    rc = RunComparison([make_trainer(small), make_trainer(small, batch_size=64)], epochs=1, refresh=0.01)
    try:
        _ends_before_start_returns(rc.controller)
        rc.train()
        assert [t.step_count for t in rc.trainers] == [25, 13] and rc._refresher.final_frames == 1
        assert rc._refresher._thread is None, "the live redraw thread outlives the runs"
    finally:
        rc.close()


# ---------------------------------------------------------------------- comparison
def test_compare_scales_lr_and_matches_runs_alone(small):
    rc = compare((16, 160), data=small, epochs=1, headless=True, interleave="steps", device="cpu")
    assert [t.peak_lr for t in rc.trainers] == pytest.approx([0.05 * 16 / 64, 0.05 * 160 / 64])
    assert [r["steps"] for r in rc.table()] == [50, 5]
    for t in rc.trainers:
        check_history(t.history)
    rc2 = RunComparison([{"batch_size": 160, "lr": 0.05, "base_batch_size": 64, "scale_rule": "linear",
                          "device": "cpu"}], data=small, epochs=1, headless=True)
    rc2.train()
    assert same_weights(rc2.trainers[0].model, rc.trainers[1].model)
    assert rc.image.value[:4] == b"\x89PNG"


def test_panel_refuses_a_batch_larger_than_the_training_set_as_it_is_chosen(small):
    p = TrainingPanel(data=small, headless=True, values={"batch_size": 32})
    try:
        p.batch_size_w.value = 4096
        assert "larger than the training set" in p.message.value and p.trainer is None
        assert p.check_settings() is not None
        p.batch_size_w.value = 32
        assert p.check_settings() is None
    finally:
        p.close()


def test_panel_runs_keep_a_run_log_each(small, tmp_path):
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"batch_size": 100}, log_dir=tmp_path)
    try:
        p.train_button.click()
        p.batch_size_w.value = 64          # a structural change: the next Train starts a second run
        p.train_button.click()
        logged = [History.read(tmp_path / f"run-00{k}") for k in (1, 2)]
        assert [len(h.steps) for h in logged] == [len(p.runs[0].history.steps), len(p.trainer.history.steps)]
        assert logged[1].steps["loss"] == p.trainer.history.steps["loss"]
        assert logged[0].steps["batch_size"][0] == 100 and logged[1].steps["batch_size"][0] == 64
    finally:
        p.close()
    with pytest.raises(ValueError, match="log_dir"):
        TrainingPanel(build=lambda **v: None, log_dir=tmp_path)


def test_compare_takes_the_seed_of_every_run(small):
    a = compare((16,), data=small, epochs=1, headless=True, interleave="steps", device="cpu", seed=3)
    b = RunComparison([{"batch_size": 16, "lr": 0.05 * 16 / 64, "device": "cpu"}], data=small, epochs=1,
                      headless=True, seed=3)
    b.train()
    c = compare((16,), data=small, epochs=1, headless=True, interleave="steps", device="cpu")   # seed 0
    assert same_weights(a.trainers[0].model, b.trainers[0].model)
    assert not same_weights(a.trainers[0].model, c.trainers[0].model)


def test_comparison_stop_is_shared_and_resumable(small):
    rc = RunComparison([{"batch_size": 8}, {"batch_size": 64}], data=small, epochs=20, interleave="steps")
    try:
        rc.train_button.click()
        wait_for(lambda: rc.trainers[1].step_count >= 3)
        rc.stop_button.click()
        assert rc.wait(TIMEOUT)
        assert rc.controller.stop_latency[-1]["steps"] <= 1
        assert all(t.step_count < 20 * t.steps_per_epoch for t in rc.trainers)
        assert abs(rc.trainers[0].step_count - rc.trainers[1].step_count) <= 1
        rc.headless = True
        rc.controller.start(steps=1, block=True)
        for t in rc.trainers:
            check_history(t.history)
    finally:
        rc.close()


def test_comparison_rejects_bad_configs(small):
    with pytest.raises(ValueError, match=r"configs\[1\].*accumulate"):
        RunComparison([{"batch_size": 8}, {"batch_size": 4, "accumulate": 8}], data=small)
    with pytest.raises(ValueError, match="configs"):
        RunComparison([], data=small)
    with pytest.raises(ValueError, match="batch_sizes"):
        compare("16", data=small)
    with pytest.raises(ValueError, match="epochs must be a number > 0, got 0"):
        compare((16,), data=small, epochs=0, headless=True)       # raised, not a message nobody sees
    with pytest.raises(ValueError, match="steps must be a positive int, got 2.5"):
        RunComparison([{"batch_size": 8}], data=small, steps=2.5)


# ---------------------------------------------------------------------- figures
def _noisy_history(n, noise_scale=False):
    h = History()
    for s in range(1, n + 1):
        row = {"step": s, "epoch": s / 100, "examples": 8 * s, "loss": 2.0 / s * (1.5 if s % 2 else 0.5), "lr": 0.1,
               "batch_size": 8, "time": 0.01 * s, "examples_per_s": 800.0, "peak_memory": None}
        if noise_scale:
            row["noise_scale"] = float(s)
        h.steps.append(row)
    return h


def test_live_figure_plots_the_history():
    h = _noisy_history(4000, noise_scale=True)
    h.evals.append({"step": 100, "epoch": 1.0, "examples": 800, "time": 1.0, "eval_loss": 0.5, "eval_accuracy": 0.7})
    fig = LiveFigure(["B=8"])
    png = fig.png([h])
    assert png[:4] == b"\x89PNG"
    xs, ys = fig._lines[("raw", 0)].get_data()
    loss = np.array(h.steps["loss"])
    # cut to what the pixels show, the band kept: its first and last steps, its minimum and maximum
    assert len(xs) <= 2 * fig._columns + 2 < 4000 and xs[0] == 1 and xs[-1] == 4000
    assert ys.min() == loss.min() and ys.max() == loss.max()
    sx, sy = fig._lines[("smooth", 0)].get_data()
    assert sx[-1] == 4000 and np.ptp(sy[-50:]) < np.ptp(loss[-50:]) / 10   # smoothed: the alternation averaged out
    assert list(fig._lines[("metric", 0)].get_ydata()) == [0.7]
    assert list(fig._lines[("eval", 0)].get_ydata()) == [0.5]
    assert fig.axes["test metric"].get_title() == "test accuracy"
    assert fig._noise_ax is not None and fig._lines[("noise", 0)].get_xdata()[-1] == 4000
    with pytest.raises(ValueError, match="histories"):
        fig.update([h, h])
    with pytest.raises(ValueError, match="x="):
        LiveFigure(["B=8"], x="epochs")


def test_live_figure_is_readable():
    """Axis labels, a legend for one run, compact ticks, a 2x2 layout at display size."""
    h = _noisy_history(20_000)
    fig = LiveFigure(["B=8"], x="examples")
    fig.png([h])
    assert len(fig.axes) == 4
    w, hgt = fig.figure.get_size_inches() * fig.figure.dpi
    assert w <= 1000 and fig.figure.dpi >= 96                         # fits an 1100 px window, not upscaled
    legend = [t.get_text() for t in fig.axes["loss"].get_legend().get_texts()]
    assert legend == ["train, per step", "train, smoothed", "test"]
    assert fig.axes["examples/s"].get_xlabel() == "examples seen" and fig.axes["loss"].get_ylabel() == "loss"
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes["examples/s"].get_xticklabels() if t.get_text()]
    assert ticks and all(len(t) <= 5 for t in ticks) and any(t.endswith("k") for t in ticks)   # '50k', not '50000'
    assert [plots.compact(v) for v in (50_000, 1_500_000, 0.05)] == ["50k", "1.5M", "0.05"]
    race = LiveFigure(["B=16", "B=128"], x="time")
    race.png([h, h])
    legend = [t.get_text() for t in race.axes["loss"].get_legend().get_texts()]
    assert legend[:2] == ["B=16", "B=128"] and "test" in legend
    assert race.axes["loss"].get_xlabel() == "" and race.axes["examples/s"].get_xlabel() == "training time (s)"


def test_envelope_keeps_extremes_and_order():
    rng = np.random.default_rng(0)
    x = np.arange(10_001.0)
    y = rng.normal(size=x.size)
    ex, ey = plots.envelope(x, y, 300)
    assert len(ex) <= 602 and np.all(np.diff(ex) > 0)
    assert ey.max() == y.max() and ey.min() == y.min() and ex[0] == 0 and ex[-1] == 10_000
    small_x, small_y = plots.envelope(x[:100], y[:100], 300)
    assert np.array_equal(small_y, y[:100])


def test_live_figure_uses_a_linear_loss_axis_for_losses_at_or_below_zero():
    h = History()
    for s, loss in enumerate([1.0, 0.5, -0.25], start=1):     # a custom loss may go below zero
        h.steps.append({"step": s, "epoch": s / 10, "examples": 8 * s, "loss": loss, "lr": 0.1, "batch_size": 8,
                        "time": 0.01 * s, "examples_per_s": 800.0, "peak_memory": None})
    fig = LiveFigure(["run"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # matplotlib's "no positive values" warning
        fig.png([h])
    assert fig.axes["loss"].get_yscale() == "linear"
    h.steps.truncate(2)
    fig.png([h])
    assert fig.axes["loss"].get_yscale() == "log"


def test_snapshot_cuts_columns_to_a_common_length():
    h = History()
    h.steps.append({"step": 1, "loss": 1.0})
    h.steps._cols["loss"].append(2.0)         # as if another thread were mid-append
    s = snapshot(h)
    assert s["steps"]["loss"] == [1.0] and s["steps"]["step"] == [1]


def test_refresher_keeps_errors_and_draws_a_final_frame():
    calls = []

    def draw():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    r = Refresher(draw, interval=0.01)
    r.start()
    wait_for(lambda: len(calls) >= 2)
    r.final()
    assert r.final_frames == 1 and r._thread is None and isinstance(r.errors[0], RuntimeError) and r.frames == len(calls) - 1
    with pytest.raises(ValueError, match="refresh interval"):
        Refresher(draw, interval=0)


def test_refresher_final_frames_from_two_threads_never_overlap():
    inside, overlaps = [], []

    def draw():
        inside.append(1)
        overlaps.append(len(inside) > 1)
        time.sleep(0.02)
        inside.pop()

    r = Refresher(draw, interval=0.01)
    r.start()
    threads = [threading.Thread(target=r.final) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert r.final_frames == 4 and len(overlaps) >= 4 and not any(overlaps) and r._thread is None


# ---------------------------------------------------------------------- Trainer.fit progress bar
def test_fit_progress_bar_flag_and_environment(small, capsys, monkeypatch):
    monkeypatch.delenv("NBBATCH_PROGRESS", raising=False)
    a = make_trainer(small)
    a.fit(steps=10, progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and "step" in err
    b = make_trainer(small)
    b.fit(steps=10)                           # default: off when stderr is not a terminal
    assert capsys.readouterr().err == ""
    assert b.history.steps["loss"] == a.history.steps["loss"]   # the bar does not change training
    monkeypatch.setenv("NBBATCH_PROGRESS", "1")
    b.fit(steps=5)
    assert "5/5" in capsys.readouterr().err
    monkeypatch.setenv("NBBATCH_PROGRESS", "0")
    b.fit(steps=5)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress"):
        b.fit(steps=5, progress="yes")
    assert b.step_count == 20


def test_panel_runs_have_no_progress_bar(small, capsys, monkeypatch):
    monkeypatch.setenv("NBBATCH_PROGRESS", "1")   # even when asked for: never from the training thread
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"batch_size": 100})
    p.train_button.click()
    assert p.trainer.step_count == 8 and capsys.readouterr().err == ""


def test_fit_progress_bar_is_labelled_and_closed(small, capsys, monkeypatch):
    """The bar names the run and shows step/total, loss and examples/s; a terminal bar is closed at the end."""
    import tqdm as tqdm_mod

    t = make_trainer(small)
    t.fit(steps=12, progress=True)
    err = capsys.readouterr().err
    assert f"B={t.config.batch_size} " in err and f"lr={t.peak_lr:.3g}" in err
    assert "12/12" in err and "loss " in err and "ex/s" in err
    assert not tqdm_mod.tqdm._instances                     # no bar left open
    # in a notebook the widget stays; a fit that ends early says where it ended
    bars = []

    class FakeNotebookBar(tqdm_mod.std.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, file=__import__("io").StringIO(), **k)
            bars.append(self)
    monkeypatch.setattr("tqdm.auto.tqdm", FakeNotebookBar)
    t.add_callback("step_end", lambda tr, row: tr.request_stop() if tr.step_count == 15 else None)
    t.fit(steps=10, progress=True)
    assert bars[0].leave and bars[0].n == 3 and "(ended at step 3)" in bars[0].desc


# ---------------------------------------------------------------------- a panel that guides
def test_panel_trains_at_the_exact_lr_given_or_typed(small):
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"lr": 0.05, "batch_size": 100})
    assert p.lr_w.value == 0.05 and p.lr_slider.value == 0.05      # no snapping to a slider grid
    p.train_button.click()
    assert p.trainer.lr == 0.05 and set(p.trainer.history.steps["lr"]) == {0.05}
    p.lr_w.value = 0.0123                                           # typed: exact, and the slider follows
    assert p.lr_slider.value == 0.0123
    p.train_button.click()
    assert p.trainer.history.steps["lr"][-1] == 0.0123
    p.lr_slider.value = 0.2                                         # the slider's stops are round values
    assert p.lr_w.value == 0.2 and p.trainer.lr == 0.2
    stops = [v for _, v in p.lr_slider.options]
    ratios = [b / a for a, b in zip(stops, stops[1:])]
    assert all(1 < r <= 2.0 for r in ratios)                        # logarithmic: a steady ratio per stop
    p.lr_w.value = -1                                               # refused, shown, the lr kept
    assert p.lr_w.value == 0.2 and "learning rate must be a number &gt; 0" in p.message.value


def test_panel_checks_settings_as_they_change(small):
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"batch_size": 16, "accumulate": 16})
    assert p.check_settings() is None
    p.batch_size_w.value = 4                      # accumulate 16 cannot split 4 examples: clamped, said
    assert p.accumulate_w.value == 4 and max(p.accumulate_w.options) == 4
    assert "accumulate set to 4" in p.message.value
    assert p.trainer is None                      # nothing was built or trained by checking
    p.warmup_w.value = 20
    assert p.check_settings() is None


def test_panel_defaults_and_wording(small):
    p = TrainingPanel(data=small, values={"batch_size": 100})
    assert 10 <= p.epochs <= 20 and p.epochs_w.value == p.epochs
    assert "run this cell" in repr(p)
    bundle = p._repr_mimebundle_()
    assert "run this cell" in bundle["text/plain"] and "application/vnd.jupyter.widget-view+json" in bundle
    p.headless = True
    p.epochs = 1
    p.train_button.click()
    assert "test accuracy" in p.status.value and "test loss" in p.status.value
    assert "step 8 / 8 (100%)" in p.progress_text.value and "done" in p.progress_text.value
    rc = RunComparison([{"batch_size": 100}], data=small, epochs=1, headless=True)
    assert "run this cell" in rc._repr_mimebundle_()["text/plain"]
    rc.train()
    assert "test accuracy" in rc.status.value and "step 8 / 8" in rc.status.value
    assert rc._figure.x == "time"                 # the race is plotted against training time
    p.close()
    rc.close()


def test_panel_progress_says_how_long_is_left(small):
    p = TrainingPanel(data=small, epochs=200, refresh=0.05, values={"batch_size": 32})
    try:
        p.train_button.click()
        deadline = time.monotonic() + TIMEOUT
        while "left" not in p.progress_text.value and time.monotonic() < deadline:
            time.sleep(0.05)
        text = p.progress_text.value
        assert "left" in text and " / 5,000 (" in text
    finally:
        p.close()


def test_live_panel_draws_its_first_frame_within_a_second_and_then_keeps_drawing(small):
    p = TrainingPanel(data=small, epochs=1000, values={"batch_size": 32})
    p._build()
    seen = []
    p.image.observe(lambda ch: seen.append(time.perf_counter()), names="value")
    try:
        t0 = time.perf_counter()
        p.train_button.click()
        deadline = t0 + TIMEOUT
        while len(seen) < 3 and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert len(seen) >= 3
        # a generous bound for a loaded machine: the design aims at 0.3 s and then 1 s per frame
        assert seen[0] - t0 < 3.0 and p._refresher.first <= 1.0 and p._refresher.max_gap <= 2.0
    finally:
        p.close()


def test_live_frames_redraw_only_the_data_and_match_a_full_draw():
    """Between limit changes a frame restores the kept background and draws the lines: same pixels."""
    import io

    from PIL import Image

    h = _noisy_history(1000)
    fig = LiveFigure(["B=8"])
    fig.png([h])
    full = fig.full_draws
    h.steps.truncate(900)                                 # inside the limits: no new background
    h2 = History()
    for row in _noisy_history(1000).steps.rows()[:950]:
        h2.steps.append(row)
    png = fig.png([h2])
    assert fig.full_draws == full
    static = LiveFigure(["B=8"], live=False)
    static.update([h2])
    for name, ax in static.axes.items():
        ax.set_autoscale_on(False)
        ax.set_xlim(fig.axes[name].get_xlim())
        ax.set_ylim(fig.axes[name].get_ylim())
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(static.png())).convert("RGB"), dtype=int)
    assert a.shape == b.shape and np.mean(np.abs(a - b) > 8) < 0.001
    h3 = _noisy_history(3000)                             # beyond the x limit: a new background, with headroom
    fig.png([h3])
    assert fig.full_draws == full + 1 and fig.axes["loss"].get_xlim()[1] > 3000


def test_the_panel_fixes_the_x_axis_to_the_runs_end(small):
    p = TrainingPanel(data=small, epochs=2, headless=True, values={"batch_size": 100})
    p.train_button.click()
    assert p._figure.x_end == 16 and p._figure.axes["loss"].get_xlim() == (0.0, 16.0)   # not past the end
    long = LiveFigure(["a"])
    long.x_end = 1_000_000
    long.png([_noisy_history(1000)])
    assert long.axes["loss"].get_xlim()[1] == 1_000_000 / 4 ** 4   # a long run: the axis grows with the data (by 4x)
    ex = LiveFigure(["a", "b"], x="examples")
    ex.set_x_end([10, 4], [8, 32])
    assert ex.x_end == 128
    race = LiveFigure(["a"], x="time")
    race.set_x_end([10], [8])
    assert race.x_end is None
    assert plots._nice(0.37, 2.4, log=True) == (0.2, 5.0)
    lo, hi = plots._nice(0.13, 0.87, log=False)
    assert lo <= 0.13 and hi >= 0.87 and plots._nice(0.12, 0.86, log=False) == (lo, hi)   # small changes: same limits
    p.close()


def test_the_figure_is_hidden_until_there_is_one(small):
    p = TrainingPanel(data=small, epochs=1, headless=True, values={"batch_size": 100})
    assert p.image.layout.display == "none" and p.image.value == b""
    p.train_button.click()
    assert p.image.layout.display is None and p.image.value[:4] == b"\x89PNG"
    assert p.image.layout.margin == "0"         # 100% wide without a margin: no sideways overflow
    p.close()


def test_a_live_panel_shows_empty_axes_before_the_first_train(small):
    p = TrainingPanel(data=small, epochs=1, values={"batch_size": 100})
    assert p.trainer is None and p.image.value[:4] == b"\x89PNG" and p.image.layout.display is None
    p.close()


# ---------------------------------------------------------------------------- the panel's choices are TrainConfig's
def test_the_panel_offers_only_choices_the_trainer_accepts(small):
    from nbbatch.config import OPTIONS, RESCHEDULE_OPTIONS, TrainConfig
    from nbbatch.ui import panel as panel_mod

    p = TrainingPanel(data=small, headless=True, values={"batch_size": 4})
    try:
        assert set(panel_mod.LIVE) <= set(RESCHEDULE_OPTIONS)
        assert not set(panel_mod.STRUCTURAL) & set(RESCHEDULE_OPTIONS)
        assert set(panel_mod.LIVE) | set(panel_mod.STRUCTURAL) == set(panel_mod.DEFAULTS)
        for name in ("optimizer", "precision"):
            assert tuple(p.controls[name].options) == OPTIONS[name].choices
        offered = {name: [v for _, v in w.options] if w.options and isinstance(w.options[0], tuple) else list(w.options)
                   for name, w in p.controls.items() if hasattr(w, "options")}
        for name, values in offered.items():
            for value in values:
                if name in OPTIONS:
                    TrainConfig(**{name: value, "batch_size": max(value, 4) if name == "accumulate" else 64})
                elif name == "model":
                    assert value in models.MODELS
                else:
                    models.make_model("mlp", small, norm=value)
        assert max(offered["accumulate"]) <= 4            # never more micro-batches than examples
        assert p.check_settings() is None
    finally:
        p.close()
