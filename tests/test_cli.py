import io
import re

import pytest

from nbbatch import cli


def test_train_prints_a_table_and_final_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    out = io.StringIO()
    args = cli.build_parser().parse_args(["train", "--dataset", "digits", "--batch-size", "128", "--epochs", "2",
                                          "--lr", "0.1", "--save", str(tmp_path / "ck.pt"),
                                          "--csv", str(tmp_path / "h.csv")])
    assert cli.train(args, out=out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("# digits")
    assert lines[2].split() == ["epoch", "steps", "train_loss", "test_loss", "test_acc", "lr", "seconds"]
    assert [line.split()[0] for line in lines[3:5]] == ["1.00", "2.00"]
    accuracy = float(lines[-2].split()[3])
    assert 0.5 < accuracy <= 1.0            # digits is easy: two epochs are well above chance (0.1)
    assert (tmp_path / "ck.pt").exists() and (tmp_path / "h.csv").exists()


def test_bad_arguments_exit_with_a_message(capsys):
    assert cli.main(["train", "--batch-size", "0"]) == 2
    assert "batch_size must be a positive int, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "nope"])


def test_no_arguments_means_default_train(monkeypatch):
    called = {}
    monkeypatch.setattr(cli, "train", lambda args, out=None: called.setdefault("args", args) and 0)
    cli.main([])
    assert called["args"].dataset == "mnist1d" and called["args"].batch_size == 64


def test_sweep_prints_the_table_b_crit_and_b_simple_and_writes_the_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    out = io.StringIO()
    figure = tmp_path / "sweep.png"
    args = cli.build_parser().parse_args(["sweep", "--dataset", "digits", "--batch-sizes", "16,64,256",
                                          "--target-loss", "0.5", "--lr", "0.05", "--lr-factors", "1",
                                          "--max-steps", "400", "--figure", str(figure)])
    assert cli.sweep(args, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("# digits")
    assert lines[2].split() == ["batch", "lr", "reached", "steps", "examples", "best"]
    runs = [line.split() for line in lines[3:6]]
    assert [r[0] for r in runs] == ["16", "64", "256"]
    # sqrt scaling from the smallest batch: 0.05, 0.1, 0.2
    assert [float(r[1]) for r in runs] == pytest.approx([0.05, 0.1, 0.2])
    assert all(r[2] == "yes" for r in runs)
    steps = [int(r[3]) for r in runs]
    assert steps[0] > steps[1] > steps[2]                    # larger batches need fewer steps
    # examples seen: B per step, less the short last batch of each of the 1437-example epochs
    for r, b, s in zip(runs, (16, 64, 256), steps):
        assert 0.85 * b * s <= int(r[4]) <= b * s
    text = out.getvalue()
    assert "B_crit = E_min/S_min = " in text and "B_simple at the target" in text
    assert figure.exists() and figure.stat().st_size > 1000


def test_sweep_defaults_are_small():
    args = cli.build_parser().parse_args(["sweep"])
    assert args.dataset == "mnist1d" and cli.parse_batch_sizes(args.batch_sizes) == [32, 64, 128, 256, 512, 1024]
    assert args.max_steps <= 2000 and args.target_loss == 1.0


def test_parse_batch_sizes():
    assert cli.parse_batch_sizes("16,32,...,4096") == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert cli.parse_batch_sizes("8,32,...,600") == [8, 32, 128, 512]
    assert cli.parse_batch_sizes("64, 16") == [64, 16]
    for bad, match in (("16,x", "'x' is not an integer"), ("16,0", "0 is not a positive"),
                       ("16,...,64", "a,b,...,z"), ("32,16,...,64", "increasing")):
        with pytest.raises(ValueError, match=match):
            cli.parse_batch_sizes(bad)


def test_sweep_bad_arguments_exit_with_a_message(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    assert cli.main(["sweep", "--dataset", "digits", "--batch-sizes", "16,x"]) == 2
    assert "'x' is not an integer" in capsys.readouterr().err
    assert cli.main(["sweep", "--dataset", "digits", "--batch-sizes", "16,4096", "--figure", ""]) == 2
    assert "4096 is larger than the training set" in capsys.readouterr().err
    assert cli.main(["sweep", "--dataset", "digits", "--lrs", "0.1,-1", "--figure", ""]) == 2
    assert "lrs must hold finite numbers > 0" in capsys.readouterr().err


# ---------------------------------------------------------------------- help, checks before output
def _subparser(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_help_describes_every_option_with_its_default(command):
    sub = _subparser(command)
    text = sub.format_help().split("options:", 1)[1]
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no description"
        # the option's line(s) in --help: from its name to the next option
        block = re.split(r"\n  " + re.escape(action.option_strings[0]) + r"[ \n]", text, maxsplit=1)[1]
        block = block.split("\n  --", 1)[0]
        block = " ".join(block.split())
        if action.default not in (None, False):
            assert f"(default: {action.default})" in block, action.option_strings[0]
        elif action.default is None:
            assert "(default: none)" in block or "(none:" in block, action.option_strings[0]
        if action.choices:   # help and error list the same choices
            assert "(one of: " + ", ".join(map(str, action.choices)) + ")" in block


def test_dataset_help_and_error_list_the_same_choices(capsys):
    block = " ".join(_subparser("train").format_help().split("options:", 1)[1].split("--dataset NAME", 1)[1].split("--num-samples")[0].split())
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", "nope"])
    err = capsys.readouterr().err
    listed = err.split("choose from ", 1)[1]
    for name in cli.DATASETS:
        assert name in block and f"'{name}'" in listed
    assert listed.count("'") == 2 * len(cli.DATASETS)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-1"], "--threads must be an integer >= 1, got -1"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--epochs", "-1"], "--epochs must be a number > 0, got -1"),
    (["--epochs", "nan"], "--epochs must be a number > 0"),
    (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
])
def test_bad_numbers_are_refused_before_any_output(argv, message, capsys):
    assert cli.main(["train", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and "Traceback" not in err


def test_output_paths_are_checked_before_training(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cases = [(["--save", str(afile / "ck.pt")], f"--save '{afile / 'ck.pt'}'", "is a file, not a directory"),
             (["--csv", str(tmp_path / "missing" / "h.csv")], "--csv", "does not exist"),
             (["--save", str(tmp_path)], "--save", "is a directory")]
    for argv, option, why in cases:
        assert cli.main(["train", "--dataset", "digits", *argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and option in err and why in err and "Traceback" not in err
        assert ".tmp" not in err                    # the path asked for, not a temporary file


def test_a_failed_checkpoint_write_names_the_option_and_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    from nbbatch import trainer as trainer_mod

    def refuse(self, path):
        raise PermissionError(13, "Permission denied", str(path) + ".tmp123")
    monkeypatch.setattr(trainer_mod.Trainer, "save", refuse)
    target = tmp_path / "ck.pt"
    assert cli.main(["train", "--dataset", "digits", "--epochs", "0.1", "--save", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--save '{target}': cannot write the checkpoint (Permission denied)" in err
    assert ".tmp123" not in err and "Traceback" not in err


def test_sweep_refuses_bad_arguments_before_any_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    for argv, message in ((["--threads", "-1"], "--threads"), (["--figure", str(tmp_path / "no" / "f.png")], "--figure"),
                          (["--batch-sizes", "16,4096", "--figure", ""], "4096 is larger than the training set")):
        assert cli.main(["sweep", "--dataset", "digits", *argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and message in err


def test_table_rows_pass_above_a_progress_bar(tmp_path, monkeypatch, capsys):
    """With the bar on, every table row is a whole line of stdout (written through tqdm)."""
    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    monkeypatch.setenv("NBBATCH_PROGRESS", "1")
    assert cli.main(["train", "--dataset", "digits", "--batch-size", "128", "--epochs", "2"]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert rows[2].split()[0] == "epoch" and [r.split()[0] for r in rows[3:5]] == ["1.00", "2.00"]
    assert "%|" not in out                               # no bar fragment in the table
    assert "B=128 momentum lr=0.05" in err and "loss" in err and "24/24" in err   # the labelled bar, on stderr


# ---------------------------------------------------------------------- flags made from TrainConfig's options
def test_train_has_a_flag_for_every_option_a_command_line_can_give_with_its_default_in_help():
    from nbbatch.config import OPTIONS, TrainConfig

    sub = _subparser("train")
    text = " ".join(sub.format_help().split())
    flags = {a.dest: a for a in sub._actions if a.option_strings}
    internal = [name for name, o in OPTIONS.items() if o.type is None]
    assert internal == ["batch_schedule", "metrics"]     # a schedule object, a mapping of callables: Python only
    defaults = TrainConfig()
    for name in cli.train_options():
        action = flags[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        default = cli.TRAIN_DEFAULTS.get(name, getattr(defaults, name))
        assert action.default == default, name
        shown = "none" if default is None else default
        assert f"(default: {shown})" in text, name
        if OPTIONS[name].choices:
            assert tuple(action.choices) == OPTIONS[name].choices


def test_the_default_flags_give_trainconfigs_defaults_except_the_cli_ones():
    from nbbatch.config import TrainConfig

    args = cli.build_parser().parse_args(["train"])
    assert TrainConfig(**cli.config_options(args)) == TrainConfig(**cli.TRAIN_DEFAULTS)


def test_every_flag_reaches_the_config():
    from nbbatch.config import TrainConfig

    args = cli.build_parser().parse_args([
        "train", "--warmup", "gradual", "--warmup-steps", "30", "--decay", "step", "--decay-epochs", "2.5",
        "--decay-gamma", "0.5", "--betas", "0.8", "0.99", "--drop-last", "--data-on-device", "false",
        "--loss", "cross_entropy", "--noise-scale-every", "10", "--adapt-all", "yes", "--optimizer", "lamb"])
    cfg = TrainConfig(**cli.config_options(args))
    assert (cfg.warmup, cfg.warmup_steps, cfg.decay, cfg.decay_epochs, cfg.decay_gamma) == ("gradual", 30, "step", 2.5, 0.5)
    assert cfg.betas == (0.8, 0.99) and cfg.drop_last is True and cfg.data_on_device is False
    assert cfg.noise_scale_every == 10 and cfg.adapt_all is True and cfg.optimizer == "lamb"


@pytest.mark.parametrize("flag", ["--optimizer", "--precision", "--warmup", "--decay", "--scale-rule", "--loss"])
def test_choice_flags_list_the_same_choices_in_help_and_error(flag, capsys):
    from nbbatch.config import OPTIONS

    choices = OPTIONS[flag[2:].replace("-", "_")].choices
    help_text = " ".join(_subparser("train").format_help().split())
    assert f"{flag} NAME" in help_text and "(one of: " + ", ".join(choices) + ")" in help_text
    with pytest.raises(SystemExit):
        cli.main(["train", flag, "nope"])
    err = capsys.readouterr().err
    assert "choose from " + ", ".join(map(repr, choices)) in err


def test_a_bad_boolean_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--drop-last", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err
