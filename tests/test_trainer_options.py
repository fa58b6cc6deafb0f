"""The optional parts of the optimizer step in combination: loss scaling with the online noise
scale, gradient noise and clipping, what an error inside a loss-scaled step leaves behind, plans
and gradient noise over several processes, loading a state that does not fit, and fit's set-up.

fp16 training needs a CUDA device, so these tests give a CPU trainer a CPU ``GradScaler``: the
step takes the same code path (scaled backward, ``unscale_``, ``scaler.step``/``update``).
"""
import math

import pytest
import torch
import torch.nn as nn

from helpers import make_mlp, same_weights, weights
from nbbatch import Trainer


class _Overflow(nn.Module):
    """A finite loss whose gradient is non-finite for the first ``overflow`` calls: what an fp16
    overflow looks like to the GradScaler, which then skips the step and lowers its scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 3)
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.overflow = 0

    def forward(self, x):
        out = self.lin(x)
        if self.overflow > 0:
            self.overflow -= 1
            return out + 0 * torch.sqrt(self.w - 1.0)   # d sqrt(w - 1)/dw at w = 1: inf, times 0 -> nan
        return out


def _scaled(trainer):
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    return trainer


def test_a_step_the_scaler_skips_records_no_noise_scale_and_leaves_the_ema_clean(toy):
    # accumulate=2: the first micro-batch (the small batch) overflows, the second one does not
    model = _Overflow()
    t = _scaled(Trainer(model, toy, batch_size=50, accumulate=2, lr=0.1, seed=0,
                        noise_scale_every=1, noise_scale_smoothing=0.5))
    model.overflow = 1
    t.fit(steps=4, progress=False)
    steps = t.history.steps
    assert t.scaler.get_scale() == 2.0 ** 15               # the first step was skipped, the scale halved
    assert steps["noise_grad_sq"][0] is None and steps["b_simple"][0] is None
    later = steps["noise_grad_sq"][1:] + steps["noise_trace"][1:] + steps["b_simple"][1:]
    assert all(v is not None and math.isfinite(v) for v in later)


def test_noise_scale_under_the_scaler_matches_the_unscaled_run(toy):
    plain = Trainer(_Overflow(), toy, batch_size=50, accumulate=2, lr=0.1, seed=0, noise_scale_every=1)
    scaled = _scaled(Trainer(_Overflow(), toy, batch_size=50, accumulate=2, lr=0.1, seed=0, noise_scale_every=1))
    plain.fit(steps=3, progress=False)
    scaled.fit(steps=3, progress=False)
    for name in ("noise_grad_sq", "noise_trace", "b_simple"):
        assert scaled.history.steps[name] == pytest.approx(plain.history.steps[name], rel=1e-4)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_an_error_inside_a_scaled_step_leaves_the_trainer_resumable(toy, clip):
    # Out of memory in the optimizer's update (Adam allocates its state there), after unscale_ ran:
    # the next step must run, not fail with "unscale_() has already been called".
    t = _scaled(Trainer(_Overflow(), toy, batch_size=50, lr=0.01, optimizer="adam", seed=0,
                        clip_grad_norm=clip, grad_noise=0.01))
    ref = _scaled(Trainer(_Overflow(), toy, batch_size=50, lr=0.01, optimizer="adam", seed=0,
                          clip_grad_norm=clip, grad_noise=0.01))
    real_step = t.optimizer.step

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    t.optimizer.step = out_of_memory
    rng = torch.get_rng_state()
    with pytest.raises(torch.OutOfMemoryError):
        t.step()
    assert t.step_count == 0 and len(t.history) == 0
    t.optimizer.step = real_step
    torch.set_rng_state(rng)   # the failed step drew its gradient noise: draw it again
    t.fit(steps=3, progress=False)
    torch.set_rng_state(rng)
    ref.fit(steps=3, progress=False)
    assert t.step_count == 3 and t.scaler.get_scale() == ref.scaler.get_scale()
    assert same_weights(t.model, ref.model)


# ---------------------------------------------------------------------------- data parallel
def _data_parallel_runs(n=96):
    """In each of two workers: a planned run, then an unseeded run with gradient noise and a progress bar."""
    from nbbatch.memory import plan

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    planned = Trainer.from_plan(make_mlp(), (x, y), plan(32, world_size=2, max_micro_batch=8, lr=0.1),
                                optimizer="momentum", seed=0)
    planned.fit(steps=2, progress=False)
    model = make_mlp()
    torch.manual_seed(planned.rank)   # the ranks' global generators differ, as they do unseeded
    noisy = Trainer(model, (x, y), batch_size=32, lr=0.1, seed=None, grad_noise=0.1)
    noisy.fit(steps=3, progress=False)
    import nbbatch.trainer.core as trainer_core   # where fit looks the bar up
    bars = []
    make_bar = trainer_core.progress_bar
    trainer_core.progress_bar = lambda progress, total: bars.append(make_bar(progress, total)) or bars[-1]
    noisy.fit(steps=1, progress=True)
    return {"planned_batch": planned.history.steps["batch_size"], "accumulate": planned.config.accumulate,
            "noisy": weights(noisy.model), "bar": bool(bars) and bars[0] is not None}


def test_data_parallel_plan_gradient_noise_and_progress_bar():
    from nbbatch.distributed import launch

    ranks = launch(_data_parallel_runs, nprocs=2, timeout=240)
    for r in ranks:
        # the plan's effective batch is 2 processes x 2 micro-batches x 8 examples = 32 per step
        assert r["planned_batch"] == [32, 32] and r["accumulate"] == 2
    # every rank adds the same noise to the same all-reduced gradient: the replicas stay equal
    assert all(torch.equal(p, q) for p, q in zip(ranks[0]["noisy"], ranks[1]["noisy"]))
    # like prints and plots, the progress bar comes from rank 0 only
    assert [r["bar"] for r in ranks] == [True, False]


def test_a_plan_for_several_processes_is_refused_in_one(toy):
    from nbbatch.memory import plan

    p = plan(64, world_size=2, lr=0.1)
    with pytest.raises(ValueError, match="world_size=2"):
        Trainer.from_plan(make_mlp(), toy, p)


# ---------------------------------------------------------------------------- state
def test_a_state_for_another_model_changes_nothing(toy):
    t = Trainer(make_mlp(), toy, batch_size=50, lr=0.1, seed=0)
    t.fit(steps=2, progress=False)
    other = Trainer(make_mlp(seed=1, d_out=4), (toy[0], toy[1] % 4), batch_size=50, lr=0.1, seed=0)
    other.fit(steps=3, progress=False)
    before, optimizer_before = weights(t.model), t.optimizer.state_dict()
    # the first layer fits, the last one does not: nothing may be copied
    with pytest.raises(ValueError, match=r"does not fit this trainer's model .*'2\.weight'"):
        t.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, weights(t.model)))
    assert t.step_count == 2 and len(t.history) == 2
    assert t.optimizer.state_dict() == optimizer_before
    t.fit(steps=1, progress=False)
    assert t.step_count == 3


# ---------------------------------------------------------------------------- fit
def test_a_progress_bar_that_fails_leaves_no_interrupt_handler_behind(toy, monkeypatch):
    import signal

    import nbbatch.trainer.core as trainer_core   # where fit looks the bar up

    def broken(progress, total):
        raise RuntimeError("no terminal")

    t = Trainer(make_mlp(), toy, batch_size=50, lr=0.1, seed=0)
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(trainer_core, "progress_bar", broken)
    with pytest.raises(RuntimeError, match="no terminal"):
        t.fit(steps=2, progress=True)
    assert signal.getsignal(signal.SIGINT) is handler   # Ctrl-C still interrupts the kernel
    monkeypatch.undo()
    t.fit(steps=2, progress=False)
    assert t.step_count == 2


def test_noise_scale_with_single_example_batches_is_refused(toy):
    # with one example per step there is no smaller batch: nothing would ever be recorded
    with pytest.raises(ValueError, match="noise_scale_every=5 .* needs batch_size >= 2, got batch_size=1"):
        Trainer(make_mlp(), toy, batch_size=1, noise_scale_every=5)
    assert Trainer(make_mlp(), toy, batch_size=2, noise_scale_every=5).config.noise_scale_every == 5
