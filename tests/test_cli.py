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
