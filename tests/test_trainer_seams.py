"""The Trainer's public seams for tools: ``snapshot``/``restore``, ``override_lr``, ``step(callbacks=False)``.

Each one is checked against a reference run that never used it: a restored trainer must go on
bitwise as if the steps between had never been taken, and an lr override must leave the
schedule the run follows afterwards exactly as it was.
"""
import threading

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import make_mlp, same_weights
from nbbatch import Trainer
from nbbatch.trainer import TrainerSnapshot

COLUMNS = ("step", "epoch", "examples", "loss", "lr", "batch_size", "noise_grad_sq", "noise_trace", "b_simple")
# everything that draws or keeps state: dropout, momentum, accumulation, clipping, gradient noise,
# the online noise scale's EMA; 200 examples in batches of 24: 9 steps an epoch, the last one short
OPTIONS = dict(batch_size=24, lr=0.05, optimizer="momentum", accumulate=2, clip_grad_norm=1.0, grad_noise=0.01,
               noise_scale_every=3, seed=3)


def make(toy, source="tensors", **options):
    data = toy if source == "tensors" else DataLoader(TensorDataset(*toy), batch_size=24, shuffle=True)
    return Trainer(make_mlp(dropout=0.3), data, **{**OPTIONS, **options})


def rows(t):
    return {c: t.history.steps[c] for c in COLUMNS}


def same_optimizer_state(a, b):
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


# ---------------------------------------------------------------------------- snapshot / restore
@pytest.mark.parametrize("source", ["tensors", "loader"])
def test_restore_goes_on_bitwise_as_if_the_steps_between_were_never_taken(toy, source):
    ref = make(toy, source)
    ref.fit(steps=4, progress=False)
    ref.fit(steps=10, progress=False)
    ref_rng = torch.get_rng_state()

    t = make(toy, source)
    t.fit(steps=4, progress=False)
    saved = t.snapshot()
    t.fit(steps=8, progress=False)                # across the epoch's end (9 steps an epoch)
    assert t.step_count == 12
    t.restore(saved)
    assert (t.step_count, t.epoch, t.batch_in_epoch, len(t.history)) == (4, 0, 4, 4)
    t.fit(steps=10, progress=False)
    assert same_weights(t.model, ref.model) and same_optimizer_state(t, ref)
    assert rows(t) == rows(ref) and rows(t)["b_simple"][-2] is not None
    assert torch.equal(torch.get_rng_state(), ref_rng)


def test_a_snapshot_can_be_restored_more_than_once(toy):
    ref = make(toy)
    ref.fit(steps=5, progress=False)
    ref.fit(steps=6, progress=False)
    t = make(toy)
    t.fit(steps=5, progress=False)
    saved = t.snapshot()
    for steps in (3, 7):
        t.fit(steps=steps, progress=False)
        t.restore(saved)
    assert saved.step == 5 and repr(saved) == "TrainerSnapshot(step=5)"
    t.fit(steps=6, progress=False)
    assert same_weights(t.model, ref.model) and rows(t) == rows(ref)


def test_restore_puts_back_gradients_and_each_modules_mode(toy):
    t = make(toy)
    t.fit(steps=2, progress=False)
    t.model[0].eval()                               # a frozen block in a training model
    grads = [p.grad.clone() for p in t.model.parameters()]
    saved = t.snapshot()
    t.model.train()
    t.step()
    t.model.eval()
    t.restore(saved)
    assert [m.training for m in t.model.modules()] == [True, False, True, True, True]
    assert all(torch.equal(p.grad, g) for p, g in zip(t.model.parameters(), grads))
    assert t.step_count == 2 and t.history.steps["step"] == [1, 2]


def test_restore_refuses_what_is_not_this_trainers_snapshot_and_a_running_fit(toy):
    t, other = make(toy), make(toy)
    with pytest.raises(TypeError, match="Trainer.snapshot"):
        t.restore(t.state_dict())
    with pytest.raises(ValueError, match="another trainer"):
        t.restore(other.snapshot())
    saved = t.snapshot()
    t.add_callback("step_end", lambda tr, row: tr.restore(saved))
    with pytest.raises(RuntimeError, match="already running fit"):
        t.fit(steps=3, progress=False)
    assert t.step_count == 1                        # the fit failed after its first step, nothing restored


# ---------------------------------------------------------------------------- override_lr
def test_override_lr_sets_each_steps_lr_and_leaves_the_schedule_untouched(toy):
    options = dict(OPTIONS, warmup="linear", warmup_steps=3, decay="cosine", total_steps=12)
    ref = make(toy, **options)
    ref.fit(steps=12, progress=False)
    t = make(toy, **options)
    t.fit(steps=4, progress=False)
    with t.override_lr(lambda step: 0.01 * (step + 1)) as same:
        assert same is t and t.lr == pytest.approx(0.05)
        overridden = [t.step()["lr"] for _ in range(3)]
    assert overridden == pytest.approx([0.05, 0.06, 0.07])
    assert t.lr == ref.history.steps["lr"][7] and t.config == ref.config and t.peak_lr == ref.peak_lr
    t.fit(steps=5, progress=False)
    lrs = t.history.steps["lr"]
    assert lrs[:4] + lrs[7:] == ref.history.steps["lr"][:4] + ref.history.steps["lr"][7:]


def test_override_lr_nests_undoes_itself_on_an_error_and_checks_its_argument(toy):
    t = make(toy, lr=0.1, noise_scale_every=None)
    with t.override_lr(lambda step: 0.5):
        with t.override_lr(lambda step: 0.25):
            assert t.step()["lr"] == 0.25
        assert t.step()["lr"] == 0.5
    with pytest.raises(ZeroDivisionError):
        with t.override_lr(lambda step: 0.5):
            1 / 0
    assert t.lr == 0.1 and t.step()["lr"] == 0.1
    with pytest.raises(TypeError, match="lr_of_step must be callable"):
        with t.override_lr(0.5):
            pass


# ---------------------------------------------------------------------------- step(callbacks=False)
def test_step_without_callbacks_runs_inside_a_tools_hold_and_matches_a_plain_step(toy):
    seen = []
    ref = make(toy)
    ref_row = ref.step()
    t = make(toy)
    t.add_callback("step_end", lambda tr, row: seen.append(row["step"]))
    with t.exclusive("probe"):                       # a tool holding the trainer may step it
        row = t.step(callbacks=False)
        refused = []
        worker = threading.Thread(target=lambda: refused.append(_refused(t.step)))
        worker.start()
        worker.join()
        assert refused == [True]                     # another thread may not
    assert seen == [] and row == {**ref_row, "time": row["time"], "examples_per_s": row["examples_per_s"]}
    assert same_weights(t.model, ref.model)
    t.step()
    assert seen == [2]
    with pytest.raises(TypeError, match="callbacks must be True or False"):
        t.step(callbacks=None)


def _refused(step) -> bool:
    try:
        step()
    except RuntimeError as err:
        return "already running probe()" in str(err)
    return False


# ---------------------------------------------------------------------------- the loss scaler
def test_without_fp16_the_scaler_is_disabled_and_checkpoints_keep_their_format(toy):
    t = make(toy, noise_scale_every=None)
    assert not t.scaler.is_enabled() and t.scaler.get_scale() == 1.0
    state = t.state_dict()
    assert state["scaler"] is None                   # as written before the scaler was always present
    fp16_state = {**state, "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                      "growth_interval": 2000, "_growth_tracker": 0}}
    t.load_state_dict(fp16_state)                    # a half-precision run's state: its scaler is ignored
    t.optimizer.step = lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(torch.OutOfMemoryError):
        t.step()
    assert not t.scaler.is_enabled() and t.step_count == 0   # the fresh scaler after a failed step too
