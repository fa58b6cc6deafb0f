"""choose_batch_size: the recommendation against known answers, the measured evidence against the
tools it comes from, and every bad input refused before anything trains."""
import math

import pytest
import torch
import torch.nn as nn

from nbbatch import Trainer, diagnostics, memory
from nbbatch.recipe import BatchSizeChoice, choose_batch_size, default_candidates

N = 512


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = (x[:, :3].argmax(1) + (torch.rand(N, generator=g) < 0.2).long()) % 3   # learnable, with label noise
    return x, y


def tiny():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def never_called():
    raise AssertionError("model_fn must not be called when all the evidence is given")


SATURATING = {b: 1000.0 * min(b, 128) for b in (8, 16, 32, 64, 128, 256)}   # throughput flat from 128 on


# ---------------------------------------------------------------------- known answers
@pytest.mark.parametrize("noise, ceiling, expected, bound", [
    (1000.0, 400, 128, "throughput"),    # the knee of the curve
    (100.0, 400, 64, "noise scale"),     # largest candidate <= 100
    (1000.0, 40, 32, "memory"),          # largest candidate <= 40
    (5.0, 400, 5, "noise scale"),        # below every candidate: the bound itself
])
def test_known_answers_from_given_evidence(xy, noise, ceiling, expected, bound):
    c = choose_batch_size(never_called, xy, max_batch_size=ceiling, throughput=SATURATING, noise_scale=noise)
    assert (c.batch_size, c.limited_by) == (expected, bound)
    assert c.knee == 128 and c.bounds["noise scale"] == noise and c.bounds["memory"] == ceiling
    assert c.sources == {"memory": "given", "throughput": "given", "noise scale": "given"}
    assert c.suggested_lr == pytest.approx(0.05 * expected / 32)


def test_fitted_knee_and_noise_factor_and_sqrt_rule(xy):
    # time per step = t0 + c B: the fitted line's knee for min_gain 1.25 is 1.5 t0 / c = 150
    t0, per = 0.01, 1e-4
    eps = {b: b / (t0 + per * b) for b in (8, 16, 32, 64, 128, 256, 512)}
    c = choose_batch_size(never_called, xy, max_batch_size=N, throughput=eps, noise_scale=600.0, knee_method="fit",
                          noise_factor=1 / 3, lr=0.1, base_batch_size=16, scale_rule="sqrt")
    assert c.knee == 128 and c.bounds["throughput"] == 128
    assert c.bounds["noise scale"] == pytest.approx(200.0)
    assert c.batch_size == 128 and c.limited_by == "throughput"
    assert c.suggested_lr == pytest.approx(0.1 * math.sqrt(128 / 16))


def test_never_exceeds_the_data_set():
    x, y = torch.randn(50, 8), torch.randint(0, 3, (50,))
    c = choose_batch_size(never_called, (x, y), max_batch_size=10_000, throughput={8: 1.0, 16: 2.0, 32: 4.0},
                          noise_scale=1e6, candidates=[8, 16, 32, 64, 128])
    assert c.candidates == [8, 16, 32] and c.batch_size == 32 and c.limited_by == "data set"
    assert c.bounds["data set"] == 50 and c.batch_size <= c.dataset_size


def test_default_candidates():
    assert default_candidates(1000) == [8, 16, 32, 64, 128, 256, 512]
    assert default_candidates(5) == [5]


# ---------------------------------------------------------------------- measured evidence
def test_measured_recommendation_respects_the_budget_and_matches_the_tools(xy):
    model = tiny()
    line = memory.measure(model, xy, [16, 32], steps=0, optimizer="momentum", lr=0.05, device="cpu").fit()
    budget = int(line.predict(100) / 0.95)   # the finder keeps 5% in reserve: about 100 examples fit
    rng = torch.get_rng_state()
    c = choose_batch_size(tiny, xy, budget=budget, warmup_steps=20, timed_steps=2, seed=3, device="cpu")
    assert torch.equal(rng, torch.get_rng_state())            # the caller's generator is left as it was
    assert isinstance(c, BatchSizeChoice) and c.sources == dict.fromkeys(("memory", "throughput", "noise scale"), "measured")
    # memory: the finder's answer for the same budget and options
    ref = memory.find_max_batch_size(tiny(), xy, budget=budget, limit=N, optimizer="momentum", lr=0.05, device="cpu")
    assert ref.batch_size == memory.find_max_batch_size(tiny(), xy, budget=budget, limit=N, strategy="model",
                                                        optimizer="momentum", lr=0.05, device="cpu").batch_size
    assert c.max_batch_size == ref.batch_size and 90 <= c.max_batch_size <= 100
    # throughput: every candidate up to the ceiling, none above
    assert sorted(c.throughput) == [b for b in default_candidates(N) if b <= c.max_batch_size] == [8, 16, 32, 64]
    assert c.knee in c.throughput
    # noise scale: the same warm-up by hand, then the exact B_simple
    torch.manual_seed(3)
    m = tiny()
    Trainer(m, xy, batch_size=32, lr=0.05, optimizer="momentum", seed=3, device="cpu").fit(steps=20)
    assert c.b_simple == pytest.approx(diagnostics.gradient_noise_scale(m, xy).b_simple, rel=1e-9)
    # the recommendation lies under every bound, and is one of the candidates or the smallest bound
    assert c.batch_size <= min(c.bounds.values()) and c.batch_size <= c.max_batch_size <= N
    assert c.limit == min(c.bounds.values()) and c.bounds[c.limited_by] == c.limit
    assert c.batch_size in c.candidates or c.batch_size == math.floor(c.limit)


def test_time_budget_stops_the_throughput_measurement(xy):
    c = choose_batch_size(tiny, xy, time_budget_s=1e-9, warmup_steps=0, timed_steps=1, noise_scale=50.0, device="cpu")
    assert list(c.throughput) == [8] and c.knee is None and "throughput" not in c.bounds
    assert any("time budget" in r for r in c.reasons)
    assert c.sources["memory"] == "none" and "memory" not in c.bounds and c.batch_size == 32


def test_lr_find_and_the_displays(xy):
    c = choose_batch_size(tiny, xy, max_batch_size=64, throughput=SATURATING, warmup_steps=10, lr_find_steps=20,
                          device="cpu")
    assert c.lr_find is not None and len(c.lr_find.lrs) <= 20 and c.lr_find.suggested_lr > 0
    assert c.warmup_steps == 10 and c.warmup_loss is not None and math.isfinite(c.b_simple)
    rows = c.rows()
    assert [r["batch_size"] for r in rows if r["chosen"]] == [c.batch_size]
    assert all(r["fits_memory"] == (r["batch_size"] <= 64) for r in rows)
    assert f"batch_size={c.batch_size}" in repr(c) and "limited by" in c.summary()
    assert "<table>" in c._repr_html_()
    fig = c.figure()
    assert len(fig.axes) == 1 and fig.axes[0].get_xscale() == "log"


def test_model_fn_must_build_a_module(xy):
    with pytest.raises(TypeError, match="model_fn must return"):
        choose_batch_size(lambda: "not a model", xy, max_batch_size=64, throughput=SATURATING, device="cpu")


# ---------------------------------------------------------------------- bad input, refused before any training
@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 0}, "budget"),
    ({"budget": 1.5e6}, "budget"),
    ({"candidates": [64, 32]}, "candidates"),
    ({"candidates": []}, "candidates"),
    ({"candidates": [8, 0]}, "candidates"),
    ({"candidates": [1024]}, "candidates"),
    ({"lr": -1.0}, "lr"),
    ({"base_batch_size": N + 1}, "base_batch_size"),
    ({"scale_rule": "cube"}, "scale_rule"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"noise_factor": 0}, "noise_factor"),
    ({"noise_sample": 1}, "noise_sample"),
    ({"min_gain": 1.0}, "min_gain"),
    ({"knee_method": "elbow"}, "knee_method"),
    ({"timed_steps": 0}, "timed_steps"),
    ({"rounds": 0}, "rounds"),
    ({"time_budget_s": -1}, "time_budget_s"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"throughput": {8: -1.0}}, "throughput"),
    ({"throughput": {}}, "throughput"),
    ({"noise_scale": float("nan")}, "noise_scale"),
    ({"lr_find_steps": 1}, "lr_find_steps"),
    ({"batch_size": 64}, "batch_size"),
    ({"optimizer": "rmsprop-ish"}, "optimizer"),
])
def test_bad_input_is_refused_before_any_work(xy, kwargs, match):
    calls = []

    def model_fn():
        calls.append(1)
        return tiny()

    with pytest.raises(ValueError, match=match):
        choose_batch_size(model_fn, xy, device="cpu", **kwargs)
    assert calls == []


def test_bad_types(xy):
    with pytest.raises(TypeError, match="model_fn"):
        choose_batch_size(tiny(), xy)
    with pytest.raises(TypeError, match="data"):
        choose_batch_size(tiny, [1, 2, 3])
    with pytest.raises(TypeError, match="throughput"):
        choose_batch_size(tiny, xy, throughput=[1.0, 2.0])
    with pytest.raises(TypeError, match="candidates"):
        choose_batch_size(tiny, xy, candidates=8)
    with pytest.raises(ValueError, match="throughput: this MemoryReport"):
        choose_batch_size(tiny, xy, throughput=memory.measure(tiny(), xy, [8, 16], steps=0, device="cpu"))


def test_throughput_rounds_keep_the_least_disturbed_measurement(xy, monkeypatch):
    # A stub device: throughput 1000 x min(B, 64), and a burst of other load that halves the first
    # measurement of B=32. Measured round-robin, the burst spoils one round only.
    calls = []

    def fake_measure(model, data, batch_sizes, **kwargs):
        (b,) = batch_sizes
        calls.append(b)
        slow = 0.5 if (b == 32 and calls.count(32) == 1) else 1.0
        return memory.MemoryReport([{"batch_size": b, "examples_per_s": slow * 1000.0 * min(b, 64)}], "stub")

    monkeypatch.setattr(memory, "measure", fake_measure)
    common = dict(max_batch_size=128, noise_scale=1e6, candidates=[8, 16, 32, 64, 128], device="cpu")
    one = choose_batch_size(tiny, xy, rounds=1, **common)
    assert one.knee == 16 and one.batch_size == 16 and one.limited_by == "throughput"   # fooled by the burst
    calls.clear()
    three = choose_batch_size(tiny, xy, rounds=3, **common)
    assert calls == [8, 16, 32, 64, 128] * 3                                            # round-robin
    assert three.throughput == {b: 1000.0 * min(b, 64) for b in (8, 16, 32, 64, 128)}
    assert three.knee == 64 and three.batch_size == 64
