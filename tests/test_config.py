"""TrainConfig's options are declared once (help, check, liveness) and everything else derives from that."""
import dataclasses

import pytest

from nbbatch import config, trainer
from nbbatch.config import OPTIONS, RESCHEDULE_OPTIONS, TrainConfig


def test_every_option_declares_help_and_a_check():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(OPTIONS) == fields
    for name, o in OPTIONS.items():
        assert o.name == name
        assert isinstance(o.help, str) and len(o.help) > 10, name
        assert callable(o.check), name
        assert f"        {name}: " in TrainConfig.__doc__, name       # the docstring's Args come from the help


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_check_refuses_a_bad_value_and_names_its_option(name):
    with pytest.raises((ValueError, TypeError)) as info:
        TrainConfig(**{name: object()})
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_default_passes_its_own_check(name):
    OPTIONS[name].check(name, getattr(TrainConfig(), name))


def test_choices_are_what_the_check_accepts():
    for name, o in OPTIONS.items():
        if o.choices is None:
            continue
        for value in o.choices:
            extra = {"warmup_steps": 1} if name == "warmup" else {}
            extra.update({"decay_steps": 1} if name == "decay" else {})
            assert getattr(TrainConfig(**{name: value}, **extra), name) == value
        with pytest.raises(ValueError, match=f"{name}='nope' is not known; use one of {o.choices!r}".replace("(", r"\(")
                           .replace(")", r"\)")):
            TrainConfig(**{name: "nope"})


def test_reschedule_options_are_the_live_ones():
    assert RESCHEDULE_OPTIONS == tuple(n for n, o in OPTIONS.items() if o.live)
    assert trainer.RESCHEDULE_OPTIONS is config.RESCHEDULE_OPTIONS
    # exactly the options that shape lr(step)
    assert set(RESCHEDULE_OPTIONS) == {"lr", "scale_rule", "base_batch_size", "warmup", "warmup_steps", "warmup_epochs",
                                       "warmup_start", "decay", "total_steps", "total_epochs", "decay_steps",
                                       "decay_epochs", "decay_gamma", "min_lr_factor"}


def test_a_live_option_reschedules_and_another_is_refused(toy):
    from nbbatch import Trainer
    from helpers import make_mlp

    t = Trainer(make_mlp(), toy, batch_size=50, lr=0.1)
    t.reschedule(decay_gamma=0.5, lr=0.2)
    assert t.config.decay_gamma == 0.5 and t.lr == pytest.approx(0.2)
    with pytest.raises(ValueError, match="cannot change mid-run"):
        t.reschedule(batch_size=25)


@pytest.mark.parametrize("options, message", [
    ({"momentum": 1.0}, "momentum must lie in [0, 1), got 1.0"),
    ({"warmup_start": 1.5}, "warmup_start must lie in [0, 1], got 1.5"),
    ({"decay_gamma": 0}, "decay_gamma must lie in (0, 1], got 0"),
    ({"min_lr_factor": -0.1}, "min_lr_factor must lie in [0, 1], got -0.1"),
    ({"noise_scale_smoothing": 1.0}, "noise_scale_smoothing must lie in [0, 1), got 1.0"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
    ({"grad_noise_gamma": -1}, "grad_noise_gamma must be a finite number >= 0, got -1"),
    ({"eps": 0}, "eps must be a finite number > 0 or None (the optimizer's default), got 0"),
    ({"clip_grad_norm": -1}, "clip_grad_norm must be a number > 0 or None, got -1"),
    ({"betas": (0.9,)}, "betas must be two numbers in [0, 1), got (0.9,)"),
    ({"warmup_steps": 1.5}, "warmup_steps must be an int >= 0, got 1.5"),
    ({"total_epochs": -1}, "total_epochs must be a number >= 0, got -1"),
    ({"eval_every": 0}, "eval_every must be a positive int, got 0"),
    ({"base_batch_size": True}, "base_batch_size must be a positive int, got True"),
    ({"drop_last": 1}, "drop_last must be True or False, got 1"),
    ({"seed": 1.0}, "seed must be an int or None, got float 1.0"),
    ({"device": 0}, "device must be a string or torch.device, got int 0"),
    ({"loss": "l1"}, "loss='l1' is not known; use one of ('cross_entropy', 'mse') or a callable"),
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not known; use one of"),
    ({"metrics": {"loss": len}}, "metrics may not be named 'loss'"),
    ({"checkpoint_segments": 1}, "checkpoint_segments must be 0 (off) or an int >= 2, got 1"),
    ({"decay": "step"}, "decay='step' needs an interval: set decay_steps or decay_epochs"),
    ({"total_steps": 5, "total_epochs": 1.0}, "give total_steps or total_epochs, not both"),
    ({"noise_scale_every": 1, "batch_size": 1}, "needs batch_size >= 2, got batch_size=1"),
    ({"optimizer": "nesterov", "momentum": 0.0}, "optimizer='nesterov' needs momentum > 0"),
    ({"adapt_all": True}, "adapt_all=True applies to optimizer='lars' or 'lamb'"),
])
def test_messages_name_the_option_and_the_value(options, message):
    with pytest.raises((ValueError, TypeError)) as info:
        TrainConfig(**options)
    assert message in str(info.value)


def test_replace_validates_again_and_knows_the_options():
    cfg = TrainConfig(lr=0.1)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        cfg.replace(lr=-1)
    with pytest.raises(TypeError, match="unknown training option"):
        cfg.replace(learning_rate=0.1)
