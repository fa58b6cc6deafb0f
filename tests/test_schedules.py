import math

import pytest
import torch

from nbbatch.schedules import Schedule, decay_factor, scale_lr, warmup_factor


def test_scale_rules_table():
    assert scale_lr(0.1, 256, 256, "linear") == pytest.approx(0.1)
    assert scale_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2)        # Goyal: k = 32
    assert scale_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert scale_lr(0.1, 64, 256, "sqrt") == pytest.approx(0.05)
    assert scale_lr(0.1, 4096, 256, "none") == 0.1
    with pytest.raises(ValueError, match="scale_rule='cubic'"):
        scale_lr(0.1, 1, 1, "cubic")
    with pytest.raises(ValueError, match="base_batch_size must be a positive int, got 0"):
        scale_lr(0.1, 1, 0)


@pytest.mark.parametrize("kind,expected", [
    ("linear", [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]),
    ("gradual", [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]),
    ("constant", [0.25, 0.25, 0.25, 0.25, 1.0, 1.0]),
    ("none", [1.0] * 6),
])
def test_warmup_table(kind, expected):
    assert [warmup_factor(s, kind, 4, 0.25) for s in range(6)] == pytest.approx(expected)


def test_decay_tables():
    cos = [decay_factor(s, "cosine", warmup_steps=2, total_steps=6, min_lr_factor=0.1) for s in range(8)]
    # progress p = (s-2)/4 -> 0.1 + 0.9 * (1 + cos(pi p)) / 2
    assert cos == pytest.approx([1.0, 1.0, 1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55,
                                 0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1, 0.1])
    lin = [decay_factor(s, "linear", total_steps=4) for s in range(6)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    step = [decay_factor(s, "step", decay_steps=3, decay_gamma=0.5) for s in range(10)]
    assert step == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])
    assert decay_factor(123, "constant") == 1.0


@pytest.mark.parametrize("warmup,decay,expected", [
    ("none", "constant", [0.4] * 8),
    ("linear", "constant", [0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4]),
    ("constant", "constant", [0.1, 0.1, 0.1, 0.4, 0.4, 0.4, 0.4, 0.4]),
    ("linear", "linear", [0.1, 0.2, 0.3, 0.4, 0.32, 0.24, 0.16, 0.08]),
    ("linear", "cosine", [0.1, 0.2, 0.3] + [0.4 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(5)]),
    ("linear", "step", [0.1, 0.2, 0.3, 0.4, 0.2, 0.2, 0.2, 0.2]),
    ("none", "cosine", [0.4 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]),
])
def test_schedule_tables(warmup, decay, expected):
    s = Schedule(0.4, warmup=warmup, warmup_steps=3 if warmup != "none" else 0, warmup_start=0.25,
                 decay=decay, total_steps=8, decay_steps=4, decay_gamma=0.5)
    assert s.values(8) == pytest.approx(expected)


def test_schedule_is_pure_and_matches_torch_lambda_lr():
    s = Schedule(0.3, warmup="linear", warmup_steps=5, warmup_start=0.1, decay="cosine", total_steps=20)
    assert s.values(20) == s.values(20)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.3)
    sched = s.lambda_lr(opt)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(s.values(20))


@pytest.mark.parametrize("kwargs,match", [
    ({"warmup": "slow", "warmup_steps": 1}, "warmup='slow'"),
    ({"decay": "exp"}, "decay='exp'"),
    ({"warmup": "linear", "warmup_steps": 0}, "needs a length"),
    ({"warmup": "linear", "warmup_steps": 10, "total_steps": 5}, r"warm-up \(10 steps\) is longer than the run \(5 steps\)"),
    ({"decay": "cosine"}, "needs total_steps"),
    ({"decay": "step"}, "needs decay_steps"),
    ({"warmup_start": 1.5}, "warmup_start"),
    ({"decay_gamma": 0.0}, "decay_gamma"),
    ({"min_lr_factor": -1}, "min_lr_factor"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(0.1, **kwargs)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        Schedule(float("nan"))
