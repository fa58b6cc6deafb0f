import csv

import pytest
from matplotlib.figure import Figure

from helpers import make_mlp
from nbbatch import History, Trainer
from nbbatch.history import Table, running_mean


def test_table_fills_missing_values_and_round_trips():
    t = Table(["a"])
    t.append({"a": 1})
    t.append({"a": 2, "b": "x"})
    assert t["a"] == [1, 2] and t["b"] == [None, "x"] and len(t) == 2
    back = Table.from_state_dict(t.state_dict())
    assert back.rows() == t.rows()
    back.truncate(1)
    assert back.rows() == [{"a": 1, "b": None}]
    with pytest.raises(KeyError, match="no column 'c'"):
        t["c"]
    with pytest.raises(ValueError, match="different lengths"):
        Table.from_state_dict({"a": [1], "b": []})


def test_history_of_a_run_exports(toy, tmp_path):
    t = Trainer(make_mlp(), toy, eval_data=toy, batch_size=40, lr=0.1, seed=0)
    h = t.fit(epochs=2)
    assert len(h) == 10 and h.steps["step"] == list(range(1, 11))
    assert h.steps["examples"] == [40 * i for i in range(1, 11)]
    assert h.steps["epoch"][4] == 1.0 and h.steps["epoch"][-1] == 2.0
    assert all(v > 0 for v in h.steps["examples_per_s"]) and h.steps["peak_memory"] == [None] * 10
    assert h.evals["step"] == [5, 10] and set(h.evals.columns) >= {"eval_loss", "eval_accuracy"}
    df = h.to_pandas()
    assert list(df["loss"]) == h.steps["loss"]
    assert list(h.to_pandas("evals")["eval_loss"]) == h.evals["eval_loss"]
    h.to_csv(tmp_path / "steps.csv")
    rows = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert len(rows) == 10 and float(rows[3]["loss"]) == pytest.approx(h.steps["loss"][3])
    assert rows[0]["peak_memory"] == ""
    h.to_csv(tmp_path / "evals.csv", kind="evals")
    assert len(list(csv.DictReader(open(tmp_path / "evals.csv")))) == 2
    for x in ("step", "examples", "epoch", "time"):
        fig = h.plot(x=x, smooth=3)
        assert isinstance(fig, Figure) and len(fig.axes) == 3
        assert fig.axes[0].get_xlabel() == x
    with pytest.raises(ValueError, match="kind must be"):
        h.to_pandas("nope")
    with pytest.raises(ValueError, match="x must be"):
        h.plot(x="nope")
    back = History()
    back.load_state_dict(h.state_dict())
    assert back.steps.rows() == h.steps.rows() and back.events == h.events
    assert "10 steps, 2 evals" in repr(h)


def test_running_mean():
    assert running_mean([2.0, 4.0, 6.0, 8.0], 3) == pytest.approx([2.0, 3.0, 4.0, 6.0])
