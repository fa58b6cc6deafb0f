"""Tests for nbbatch.data: shapes, determinism, caching, known statistics, IDX parsing, errors."""

from __future__ import annotations

import gzip
import json
import random
import struct

import numpy as np
import pytest
import torch

from nbbatch import data as D
from nbbatch.data import (
    DATASETS,
    DataBundle,
    digits,
    idx_dataset,
    linear_regression,
    load_dataset,
    mnist1d,
    read_idx,
    teacher_student,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Keep every mnist1d cache of this module in a fresh temporary directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NBBATCH_CACHE", str(cache))
    return cache


@pytest.fixture
def count_make_dataset(monkeypatch):
    """Count calls of mnist1d.data.make_dataset (the expensive, RNG-touching generator)."""
    import mnist1d.data

    calls = []
    original = mnist1d.data.make_dataset

    def counting(args=None, template=None):
        calls.append(args.num_samples)
        return original(args, template)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    return calls


def _assert_same_tensors(a: DataBundle, b: DataBundle) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


# ---------------------------------------------------------------------------
# DataBundle
# ---------------------------------------------------------------------------


def _toy(**overrides):
    kwargs = dict(
        x_train=torch.zeros(4, 3), y_train=torch.tensor([0, 1, 0, 1]),
        x_test=torch.zeros(2, 3), y_test=torch.tensor([1, 0]),
        num_classes=2, description="toy: 4 train / 2 test", spec={"name": "toy", "kwargs": {}},
    )
    kwargs.update(overrides)
    return DataBundle(**kwargs)


def test_bundle_properties_and_accessors():
    b = _toy()
    assert (b.n_train, b.n_test, b.in_shape, b.num_features) == (4, 2, (3,), 3)
    assert repr(b) == "toy: 4 train / 2 test"
    assert b.train()[0] is b.x_train and b.test()[1] is b.y_test
    assert b.info == {}
    with pytest.raises(AttributeError):
        b.num_classes = 3  # frozen
    assert _toy(x_train=torch.zeros(4, 2, 5), x_test=torch.zeros(2, 2, 5)).num_features == 10


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(y_train=torch.tensor([0, 1, 0])), ValueError, "x_train and y_train"),
        (dict(y_test=torch.tensor([0, 1, 0])), ValueError, "x_test and y_test"),
        (dict(x_train=torch.zeros(0, 3), y_train=torch.zeros(0, dtype=torch.long)), ValueError, "x_train is empty"),
        (dict(x_test=torch.zeros(2, 4)), ValueError, "x_test must have the same per-sample shape"),
        (dict(x_train=np.zeros((4, 3))), TypeError, "x_train must be a torch.Tensor"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(spec={"kwargs": {}}), ValueError, "spec"),
        (dict(spec={"name": "toy", "kwargs": {"t": torch.zeros(1)}}), TypeError, "spec"),
    ],
)
def test_bundle_validation(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _toy(**overrides)


# ---------------------------------------------------------------------------
# mnist1d
# ---------------------------------------------------------------------------


def test_mnist1d_default_shapes(tmp_path):
    data = mnist1d(cache_dir=tmp_path)
    assert (data.n_train, data.n_test, data.in_shape, data.num_classes) == (4000, 1000, (40,), 10)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_test.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert repr(data) == "mnist1d: 4000 train / 1000 test, 40 features, 10 classes"
    assert set(data.y_train.tolist()) == set(range(10))
    assert data.spec == {"name": "mnist1d", "kwargs": {"num_samples": 5000, "train_split": 0.8, "seed": 42}}
    json.dumps(data.spec)  # plain JSON


def test_mnist1d_matches_make_dataset_directly():
    import mnist1d.data as mnist1d_data

    args = mnist1d_data.get_dataset_args()
    args.num_samples, args.seed = 300, 3
    ref = mnist1d_data.make_dataset(args)
    data = mnist1d(num_samples=300, seed=3)
    np.testing.assert_array_equal(data.x_train.numpy(), ref["x"].astype(np.float32))
    np.testing.assert_array_equal(data.y_test.numpy(), ref["y_test"])


@pytest.mark.parametrize("num_samples, train_split, expected", [(500, 0.8, (400, 100)), (1000, 0.5, (500, 500)), (200, 0.9, (180, 20))])
def test_mnist1d_num_samples_scaling(num_samples, train_split, expected):
    data = mnist1d(num_samples=num_samples, train_split=train_split)
    assert (data.n_train, data.n_test) == expected


def test_mnist1d_deterministic_and_cached(_cache_in_tmp, count_make_dataset):
    a = mnist1d(num_samples=300, seed=7)
    assert count_make_dataset == [300]
    files = sorted(p.name for p in _cache_in_tmp.iterdir())
    assert len(files) == 1 and files[0].endswith(".npz")  # no leftover temp file
    b = mnist1d(num_samples=300, seed=7)
    assert count_make_dataset == [300]  # cache hit: not generated again
    _assert_same_tensors(a, b)

    # Same parameters generated afresh (other cache dir) give identical tensors too.
    c = mnist1d(num_samples=300, seed=7, cache_dir=_cache_in_tmp / "other")
    assert count_make_dataset == [300, 300]
    _assert_same_tensors(a, c)

    d = mnist1d(num_samples=300, seed=8)
    assert not torch.equal(a.x_train, d.x_train)


def test_mnist1d_cache_file_follows_umask(_cache_in_tmp):
    import os

    old = os.umask(0o022)
    try:
        mnist1d(num_samples=100)
    finally:
        os.umask(old)
    (path,) = _cache_in_tmp.glob("*.npz")
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others sharing the cache


def test_mnist1d_explicit_cache_dir_beats_env(tmp_path, _cache_in_tmp):
    mnist1d(num_samples=100, cache_dir=tmp_path / "explicit")
    assert len(list((tmp_path / "explicit").glob("*.npz"))) == 1
    assert not _cache_in_tmp.exists()


def test_mnist1d_leaves_global_rng_untouched(count_make_dataset):
    np.random.seed(1234)
    random.seed(1234)
    np_before, py_before = np.random.get_state(), random.getstate()
    mnist1d(num_samples=100, seed=0)
    assert count_make_dataset == [100]  # the generator did run
    np_after = np.random.get_state()
    assert np_after[0] == np_before[0] and all(
        np.array_equal(x, y) for x, y in zip(np_before[1:], np_after[1:])
    )
    assert random.getstate() == py_before
    assert np.random.rand() == np.random.RandomState(1234).rand()


def test_mnist1d_unwritable_cache_dir_still_works(tmp_path, count_make_dataset):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    data = mnist1d(num_samples=100, cache_dir=blocker / "cache")
    assert data.n_train == 80
    data2 = mnist1d(num_samples=100, cache_dir=blocker / "cache")
    assert count_make_dataset == [100, 100]  # nothing cached, regenerated
    _assert_same_tensors(data, data2)


def test_mnist1d_corrupt_cache_is_regenerated(_cache_in_tmp, count_make_dataset):
    a = mnist1d(num_samples=100)
    (path,) = _cache_in_tmp.glob("*.npz")
    path.write_bytes(b"garbage")
    b = mnist1d(num_samples=100)
    assert count_make_dataset == [100, 100]
    _assert_same_tensors(a, b)
    c = mnist1d(num_samples=100)  # rewritten cache is good again
    assert count_make_dataset == [100, 100]
    _assert_same_tensors(a, c)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_samples=5), ValueError, "num_samples"),
        (dict(num_samples=100.0), TypeError, "num_samples"),
        (dict(num_samples=True), TypeError, "num_samples"),
        (dict(train_split=1.0), ValueError, "train_split"),
        (dict(train_split=0.0), ValueError, "train_split"),
        (dict(train_split="0.8"), TypeError, "train_split"),
        (dict(num_samples=10, train_split=0.05), ValueError, "num_samples=10 with train_split"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(cache_dir=3), TypeError, "cache_dir"),
    ],
)
def test_mnist1d_errors(kwargs, exc, match, count_make_dataset):
    with pytest.raises(exc, match=match):
        mnist1d(**kwargs)
    assert count_make_dataset == []  # rejected before any work


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_shapes_range_and_stratification():
    data = digits()
    assert (data.n_train, data.n_test, data.in_shape, data.num_classes) == (1437, 360, (64,), 10)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    x_all = torch.cat([data.x_train, data.x_test])
    assert float(x_all.min()) == 0.0 and float(x_all.max()) == 1.0
    # Stratified: each class's share of the test set matches its share overall (within one sample).
    y_all = torch.cat([data.y_train, data.y_test])
    overall = torch.bincount(y_all, minlength=10).double()
    test_counts = torch.bincount(data.y_test, minlength=10).double()
    assert torch.all((test_counts - overall * data.n_test / len(y_all)).abs() <= 1.0)


def test_digits_seed_and_fraction():
    a, b, c = digits(seed=1), digits(seed=1), digits(seed=2)
    _assert_same_tensors(a, b)
    assert not torch.equal(a.y_train, c.y_train)
    assert digits(test_fraction=0.5).n_test == 899


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [(dict(test_fraction=0.0), ValueError, "test_fraction"), (dict(test_fraction=1.5), ValueError, "test_fraction"),
     (dict(seed=1.5), TypeError, "seed")],
)
def test_digits_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        digits(**kwargs)


# ---------------------------------------------------------------------------
# synthetic problems
# ---------------------------------------------------------------------------


def test_linear_regression_known_statistics():
    data = linear_regression(n_train=20000, n_test=100, dim=8, noise=0.3, seed=1)
    assert data.num_classes is None
    assert data.x_train.shape == (20000, 8) and data.y_train.shape == (20000,)
    assert data.y_train.dtype == torch.float32 and data.x_train.dtype == torch.float32
    w_true = data.info["w_true"]
    assert w_true.shape == (8,) and data.info["noise"] == 0.3
    residual = data.y_train - data.x_train @ w_true
    # Std of 20000 N(0, 0.3^2) draws: standard error ~ 0.3 / sqrt(2 * 20000) = 0.0015.
    assert abs(float(residual.std()) - 0.3) < 0.01
    assert abs(float(residual.mean())) < 0.01
    # Least squares recovers w_true (known answer).
    w_hat = torch.linalg.lstsq(data.x_train, data.y_train.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(w_hat, w_true, atol=0.01)
    assert repr(data) == "linear_regression: 20000 train / 100 test, 8 features, regression"


def test_linear_regression_noise_free_and_reproducible():
    data = linear_regression(n_train=64, n_test=16, dim=4, noise=0.0)
    assert torch.allclose(data.y_train, data.x_train @ data.info["w_true"])
    _assert_same_tensors(data, linear_regression(n_train=64, n_test=16, dim=4, noise=0.0))
    # w_true is drawn first, so it does not depend on the sample counts.
    assert torch.equal(data.info["w_true"], linear_regression(n_train=10, n_test=5, dim=4).info["w_true"])


def test_teacher_student_labels():
    data = teacher_student()
    assert (data.n_train, data.n_test, data.in_shape, data.num_classes) == (4096, 1024, (20,), 10)
    assert data.y_train.dtype == torch.int64
    assert set(data.y_train.tolist()) == set(range(10))
    _assert_same_tensors(data, teacher_student())
    info = data.info
    assert info["w1"].shape == (20, 32) and info["b1"].shape == (32,) and info["w2"].shape == (32, 10)
    logits = torch.tanh(data.x_test @ info["w1"] + info["b1"]) @ info["w2"]
    assert torch.equal(logits.argmax(1), data.y_test)
    assert not torch.equal(teacher_student(seed=1).y_train, data.y_train)


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        (linear_regression, dict(n_train=0), ValueError, "n_train"),
        (linear_regression, dict(n_test=-1), ValueError, "n_test"),
        (linear_regression, dict(dim=2.0), TypeError, "dim"),
        (linear_regression, dict(noise=-0.1), ValueError, "noise"),
        (linear_regression, dict(noise=float("nan")), ValueError, "noise"),
        (linear_regression, dict(seed="0"), TypeError, "seed"),
        (teacher_student, dict(num_classes=1), ValueError, "num_classes"),
        (teacher_student, dict(hidden=0), ValueError, "hidden"),
        (teacher_student, dict(dim=0), ValueError, "dim"),
        (teacher_student, dict(n_train=None), TypeError, "n_train"),
    ],
)
def test_synthetic_errors(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)


# ---------------------------------------------------------------------------
# load_dataset / specs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("mnist1d", dict(num_samples=200, seed=5)),
        ("digits", dict(test_fraction=0.25, seed=3)),
        ("linear_regression", dict(n_train=50, n_test=10, dim=3, noise=0.1, seed=2)),
        ("teacher_student", dict(n_train=50, n_test=10, dim=4, num_classes=3, hidden=8, seed=2)),
    ],
)
def test_load_dataset_by_name_and_spec_round_trip(name, kwargs):
    data = load_dataset(name, **kwargs)
    assert data.spec["name"] == name and data.spec["kwargs"] == {**data.spec["kwargs"], **kwargs}
    again = load_dataset(json.loads(json.dumps(data.spec)))  # through JSON, as a saved run would
    _assert_same_tensors(data, again)
    assert again.num_classes == data.num_classes and again.description == data.description
    for key, value in data.info.items():
        assert torch.equal(value, again.info[key]) if isinstance(value, torch.Tensor) else value == again.info[key]


def test_load_dataset_spec_with_override():
    data = load_dataset(linear_regression(n_train=20, n_test=5).spec, seed=9)
    assert data.spec["kwargs"]["seed"] == 9 and data.n_train == 20


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset name 'cifar'.*mnist1d, digits, linear_regression, teacher_student, idx"):
        load_dataset("cifar")
    with pytest.raises(TypeError, match="name_or_spec"):
        load_dataset(3)
    with pytest.raises(ValueError, match="name_or_spec"):
        load_dataset({"kwargs": {}})
    with pytest.raises(TypeError, match="bogus"):
        load_dataset("digits", bogus=1)
    assert DATASETS == ("mnist1d", "digits", "linear_regression", "teacher_student", "idx")


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path, array: np.ndarray, *, gz: bool = False) -> None:
    """Write ``array`` as an IDX file by hand (the reference the reader is checked against)."""
    code = _CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _mnist_like(rng, n, h=4, w=3, classes=5):
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(_CODES))
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((5, 3, 2)) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array, gz=gz)
    out = read_idx(path)
    assert tuple(out.shape) == (5, 3, 2)
    np.testing.assert_array_equal(out.numpy(), array)
    assert out.numpy().dtype == np.dtype(dtype)  # native byte order, same type


def test_read_idx_labels_1d(tmp_path):
    labels = np.array([7, 2, 1, 0, 4], dtype=np.uint8)
    write_idx(tmp_path / "labels", labels)
    out = read_idx(str(tmp_path / "labels"))
    assert out.dtype == torch.uint8 and out.tolist() == [7, 2, 1, 0, 4]


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05")  # type code 0x07 does not exist
    with pytest.raises(ValueError, match="/bad: bad IDX magic number 0x00000701"):
        read_idx(bad)
    not_idx = tmp_path / "text.txt"
    not_idx.write_text("hello world")
    with pytest.raises(ValueError, match="text.txt: bad IDX magic"):
        read_idx(not_idx)

    good = tmp_path / "good"
    write_idx(good, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    raw = good.read_bytes()
    short = tmp_path / "short"
    short.write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="short: truncated IDX file"):
        read_idx(short)
    header_only = tmp_path / "header"
    header_only.write_bytes(raw[:9])
    with pytest.raises(ValueError, match="header: truncated IDX header"):
        read_idx(header_only)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="tiny: truncated"):
        read_idx(tiny)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing: 1 unexpected trailing bytes"):
        read_idx(trailing)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match="broken.gz: corrupt or truncated gzip"):
        read_idx(broken_gz)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")
    with pytest.raises(TypeError, match="path"):
        read_idx(5)


def _write_mnist_dir(directory, *, gz_train=False, gz_test=True, n_train=12, n_test=6):
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = _mnist_like(rng, n_train)
    te_x, te_y = _mnist_like(rng, n_test)
    suffix_tr, suffix_te = (".gz" if gz_train else ""), (".gz" if gz_test else "")
    write_idx(directory / f"train-images-idx3-ubyte{suffix_tr}", tr_x, gz=gz_train)
    write_idx(directory / f"train-labels-idx1-ubyte{suffix_tr}", tr_y, gz=gz_train)
    write_idx(directory / f"t10k-images-idx3-ubyte{suffix_te}", te_x, gz=gz_test)
    write_idx(directory / f"t10k-labels-idx1-ubyte{suffix_te}", te_y, gz=gz_test)
    return tr_x, tr_y, te_x, te_y


def test_idx_dataset_from_directory(tmp_path):
    tr_x, tr_y, te_x, te_y = _write_mnist_dir(tmp_path / "mymnist")
    data = idx_dataset(tmp_path / "mymnist")
    assert (data.n_train, data.n_test, data.in_shape, data.num_classes) == (12, 6, (12,), 5)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    np.testing.assert_allclose(data.x_train.numpy(), tr_x.reshape(12, -1).astype(np.float32) / 255, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(data.y_test.numpy(), te_y)
    assert float(data.x_test.max()) <= 1.0 and float(data.x_test.min()) >= 0.0
    assert repr(data) == "idx (mymnist): 12 train / 6 test, 12 features, 5 classes"
    # The spec holds absolute paths and rebuilds the same tensors through load_dataset.
    _assert_same_tensors(data, load_dataset(json.loads(json.dumps(data.spec))))
    assert idx_dataset(tmp_path / "mymnist", num_classes=10).num_classes == 10


def test_idx_dataset_explicit_paths(tmp_path):
    _write_mnist_dir(tmp_path, gz_train=True, gz_test=False)
    data = idx_dataset(
        train_images=tmp_path / "train-images-idx3-ubyte.gz",
        train_labels=str(tmp_path / "train-labels-idx1-ubyte.gz"),
        test_images=tmp_path / "t10k-images-idx3-ubyte",
        test_labels=tmp_path / "t10k-labels-idx1-ubyte",
    )
    _assert_same_tensors(data, idx_dataset(tmp_path))
    assert load_dataset("idx", directory=tmp_path).n_train == 12


def test_idx_dataset_errors(tmp_path):
    _write_mnist_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="test_labels.*t10k-labels-idx1-ubyte"):
        idx_dataset(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=r"train_images='.*missing-file'"):
        idx_dataset(tmp_path / "d", train_images=tmp_path / "missing-file")
    with pytest.raises(FileNotFoundError, match="train_images.*train_labels.*test_images.*test_labels"):
        idx_dataset()
    with pytest.raises(FileNotFoundError, match="directory"):
        idx_dataset(tmp_path / "no-such-dir")
    with pytest.raises(TypeError, match="directory"):
        idx_dataset(3)

    _write_mnist_dir(tmp_path / "e")
    with pytest.raises(ValueError, match="num_classes=3 is too small"):
        idx_dataset(tmp_path / "e", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        idx_dataset(tmp_path / "e", num_classes=0)
    # Labels file with the wrong count.
    write_idx(tmp_path / "e" / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="train_images .* has 12 images but train_labels .* has 5 labels"):
        idx_dataset(tmp_path / "e")
    # Float labels are not class labels.
    write_idx(tmp_path / "e" / "train-labels-idx1-ubyte", np.zeros(12, dtype=np.float32))
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        idx_dataset(tmp_path / "e")


def test_module_has_no_eager_heavy_imports():
    # mnist1d and sklearn are imported lazily inside the loaders (GUIDE: nothing at import).
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(D))
    top_level = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "mnist1d" not in top_level and "sklearn" not in top_level


# ---------------------------------------------------------------------------
# The .npz cache: a hit imports no generator; keys follow the generator's version
# ---------------------------------------------------------------------------


def test_cache_hit_imports_neither_mnist1d_nor_scikit_learn(_cache_in_tmp):
    import os
    import subprocess
    import sys

    mnist1d(num_samples=200, seed=5)
    digits(seed=4)                                   # both cached in NBBATCH_CACHE now
    code = ("import sys\nfrom nbbatch import data\n"
            "a = data.mnist1d(num_samples=200, seed=5); b = data.digits(seed=4)\n"
            "print(a.n_train, b.n_train, sorted(m for m in ('mnist1d', 'scipy', 'sklearn') if m in sys.modules))")
    env = {**os.environ, "NBBATCH_CACHE": str(_cache_in_tmp), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["160", "1437", "[]"]
    # and on a miss the generator is imported (the check above can fail)
    env["NBBATCH_CACHE"] = str(_cache_in_tmp / "empty")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'mnist1d'" in out.stdout and "'sklearn'" in out.stdout


def test_cache_key_follows_generator_version(_cache_in_tmp, count_make_dataset, monkeypatch):
    a = mnist1d(num_samples=100)
    real = D._generator_version
    monkeypatch.setattr(D, "_generator_version", lambda package: real(package) + "+other")
    b = mnist1d(num_samples=100)                     # another mnist1d release: a miss, generated again
    assert count_make_dataset == [100, 100]
    assert len(list(_cache_in_tmp.glob("mnist1d_*.npz"))) == 2
    _assert_same_tensors(a, b)
    assert real("no-such-package-nbbatch") == "not-installed"


def test_digits_cache_hit_miss_and_corrupt_file(_cache_in_tmp, monkeypatch):
    calls = []
    make = D._make_digits
    monkeypatch.setattr(D, "_make_digits", lambda *a: calls.append(a) or make(*a))
    a = digits(seed=3)
    (path,) = _cache_in_tmp.glob("digits_*.npz")
    b = digits(seed=3)
    assert calls == [(0.2, 3)]                      # the second call was a hit
    _assert_same_tensors(a, b)
    digits(seed=3, test_fraction=0.25)              # other arguments: a miss
    assert calls == [(0.2, 3), (0.25, 3)]
    path.write_bytes(path.read_bytes()[:50])         # truncated: regenerated and rewritten
    c = digits(seed=3)
    assert calls[-1] == (0.2, 3) and len(calls) == 3
    _assert_same_tensors(a, c)
    digits(seed=3)
    assert len(calls) == 3
    # the cached split is the one scikit-learn makes
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, x_te, _, y_te = train_test_split(x, y, test_size=0.2, random_state=3, stratify=y)
    np.testing.assert_array_equal(c.x_test.numpy(), (x_te / 16.0).astype(np.float32))
    np.testing.assert_array_equal(c.y_test.numpy(), y_te)
