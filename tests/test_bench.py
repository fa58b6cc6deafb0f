"""The benchmark's contenders compute the same thing (a timing comparison of different work is void)."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_trainer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trainer", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("batch_size", [32, 256])
def test_trainer_and_hand_loop_reach_identical_weights(bench, batch_size, tmp_path, monkeypatch):
    from nbbatch import data

    monkeypatch.setenv("NBBATCH_CACHE", str(tmp_path))
    d = data.mnist1d(num_samples=1000)
    trainer_loss, hand_loss, max_diff = bench.check_same_result(d, batch_size, 1)
    assert max_diff == 0.0
    assert trainer_loss == pytest.approx(hand_loss, rel=0, abs=1e-7)
