import io

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
