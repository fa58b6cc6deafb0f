"""Datasets as one small object: :class:`DataBundle`.

Every loader returns a :class:`DataBundle` of four CPU tensors plus the few facts a
notebook needs (number of classes, a one-line description, a JSON-able ``spec`` that
rebuilds the data exactly with :func:`load_dataset`). Moving data to the training
device and slicing batches is the trainer's job, not this module's.

Sources:

- :func:`mnist1d`: Greydanus' MNIST-1D, generated offline with ``mnist1d.data.make_dataset``
  (never its downloading ``get_dataset``) and cached as ``.npz``.
- :func:`digits`: scikit-learn's 8x8 digits, shipped with scikit-learn (the split cached as ``.npz``).
- :func:`linear_regression`, :func:`teacher_student`: synthetic problems whose true
  parameters are kept in ``bundle.info``, so gradient statistics have known answers.
- :func:`read_idx`, :func:`idx_dataset`: MNIST-format IDX files the user already has.
  The IDX parser is written by hand because no maintained, dependency-free library
  reads IDX files into tensors (torchvision's reader is private and pulls in torchvision).

Nothing here runs at import time; ``mnist1d`` and ``sklearn`` are imported lazily, and only
when their data are not cached yet.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import math
import numbers
import os
import random
import struct
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .checks import check_int

__all__ = [
    "DATASETS",
    "DataBundle",
    "digits",
    "idx_dataset",
    "linear_regression",
    "load_dataset",
    "mnist1d",
    "read_idx",
    "teacher_student",
]

DATASETS = ("mnist1d", "digits", "linear_regression", "teacher_student", "idx")

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class DataBundle:
    """A train/test dataset held as CPU tensors, with what is known about it.

    Args:
        x_train: Training inputs, float32, shape ``(N, ...)``.
        y_train: Training targets: int64 class labels ``(N,)`` for classification,
            float32 ``(N,)`` or ``(N, k)`` for regression.
        x_test: Test inputs, same trailing shape as ``x_train``.
        y_test: Test targets, like ``y_train``.
        num_classes: Number of classes, or ``None`` for regression.
        description: One line, e.g. ``"mnist1d: 4000 train / 1000 test, 40 features, 10 classes"``.
        spec: ``{"name": ..., "kwargs": {...}}`` of plain JSON values;
            ``load_dataset(bundle.spec)`` rebuilds the same tensors.
        info: Known statistics of synthetic problems (true weights, noise std); empty otherwise.

    Example:
        >>> b = DataBundle(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(2, 3),
        ...                torch.tensor([1, 0]), 2, "toy: 4 train / 2 test", {"name": "toy", "kwargs": {}})
        >>> b.n_train, b.n_test, b.in_shape, b.num_features
        (4, 2, (3,), 3)
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: Optional[int]
    description: str
    spec: dict
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(f"{name} must have a leading sample dimension, got a 0-d tensor")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"x_{split} and y_{split} must have the same length, "
                    f"got {len(x)} and {len(y)} samples"
                )
        if len(self.x_train) == 0:
            raise ValueError("x_train is empty: a DataBundle needs at least one training sample")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(
                f"x_test must have the same per-sample shape as x_train, "
                f"got {tuple(self.x_test.shape[1:])} and {tuple(self.x_train.shape[1:])}"
            )
        if self.num_classes is not None and (
            not isinstance(self.num_classes, numbers.Integral)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {self.num_classes!r}")
        if not isinstance(self.description, str):
            raise TypeError(f"description must be a str, got {type(self.description).__name__}")
        if not isinstance(self.spec, dict) or not isinstance(self.spec.get("name"), str):
            raise ValueError(f"spec must be a dict with a 'name' str, got {self.spec!r}")
        try:
            json.dumps(self.spec)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"spec must hold only plain JSON values, got {self.spec!r}: {exc}") from None
        if not isinstance(self.info, dict):
            raise TypeError(f"info must be a dict, got {type(self.info).__name__}")

    @property
    def in_shape(self) -> tuple:
        """Per-sample input shape, ``x_train.shape[1:]``, e.g. ``(40,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        """Number of input values per sample (product of :attr:`in_shape`), e.g. ``40``."""
        return math.prod(self.in_shape)

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return len(self.x_test)

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x_train, y_train)``.

        Example:
            >>> x, y = linear_regression(n_train=8, n_test=4, dim=3).train()
            >>> x.shape, y.shape
            (torch.Size([8, 3]), torch.Size([8]))
        """
        return self.x_train, self.y_train

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x_test, y_test)``.

        Example:
            >>> x, y = linear_regression(n_train=8, n_test=4, dim=3).test()
            >>> x.shape
            torch.Size([4, 3])
        """
        return self.x_test, self.y_test

    def __repr__(self) -> str:
        return self.description


# ---------------------------------------------------------------------------
# Argument checks (messages name the parameter and the bad value)
# ---------------------------------------------------------------------------


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def _check_seed(value: Any) -> int:
    return check_int("seed", value, minimum=0)


def _describe(name: str, x_train: torch.Tensor, x_test: torch.Tensor, num_classes: Optional[int]) -> str:
    shape = tuple(x_train.shape[1:])
    features = f"{shape[0]} features" if len(shape) == 1 else f"input shape {shape}"
    target = f"{num_classes} classes" if num_classes is not None else "regression"
    return f"{name}: {len(x_train)} train / {len(x_test)} test, {features}, {target}"


# ---------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------


def _cache_dir(cache_dir: Optional[PathLike]) -> Path:
    # Read the environment at call time, never in a default argument (GUIDE 2.2).
    if cache_dir is None:
        cache_dir = os.environ.get("NBBATCH_CACHE") or os.path.join("~", ".cache", "nbbatch")
    elif not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {cache_dir!r}")
    return Path(cache_dir).expanduser()


def _load_npz(path: Path) -> Optional[dict]:
    """Read a cached dataset, or return None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        # A missing, truncated or foreign file is a cache miss: regenerate.
        return None


def _save_npz_atomic(path: Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically; silently skip when the directory is not writable."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same directory so os.replace is an atomic rename: a reader
        # (another kernel, a parallel test) never sees a half-written cache file.
        # open(..., "xb") rather than tempfile: the file gets the umask's mode (tempfile
        # forces 0600, which would hide a shared cache from other users).
        tmp_name = str(path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
        with open(tmp_name, "xb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError:
        # Caching is an optimisation only: a read-only home or cache dir must not stop a run.
        pass
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _cached(path: Path, make) -> dict:
    """The arrays cached at ``path``, or ``make()``'s, written there for next time."""
    arrays = _load_npz(path)
    if arrays is None:
        arrays = make()
        _save_npz_atomic(path, arrays)
    return arrays


def _make_mnist1d(num_samples: int, train_split: float, seed: int) -> dict:
    import mnist1d.data as mnist1d_data  # lazy: it imports matplotlib

    args = mnist1d_data.get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    # make_dataset reseeds numpy's and python's global RNGs (mnist1d.utils.set_seed);
    # restore them so building data never changes a user's random stream.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = mnist1d_data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.ascontiguousarray(ds["x"], dtype=np.float32),
        "y": np.ascontiguousarray(ds["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(ds["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(ds["y_test"], dtype=np.int64),
    }


def _generator_version(package: str) -> str:
    """The installed version of ``package`` read from its metadata (the package is not imported)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"     # a miss then; generating raises the ImportError that says so


def _cache_path(directory: Path, stem: str, generator: str, package: str, **arguments) -> Path:
    """``directory/<stem>_<digest>.npz``, the digest keyed on the generator, the installed version of
    ``package`` (read from its metadata, so a cache hit never imports it: mnist1d imports scipy and
    matplotlib, scikit-learn scipy, about 50 MiB a kernel) and every argument; a release that
    changes a default of the generator's other arguments cannot serve a stale file."""
    key = {"generator": generator, "version": _generator_version(package), "format": 1, **arguments}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return directory / f"{stem}_{digest}.npz"


def mnist1d(
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    cache_dir: Optional[PathLike] = None,
) -> DataBundle:
    """Greydanus' MNIST-1D, generated offline and cached on disk.

    The data come from ``mnist1d.data.make_dataset`` (nothing is downloaded). The
    global numpy and ``random`` states are restored afterwards. Arrays are cached as
    ``.npz`` in ``cache_dir``, else ``$NBBATCH_CACHE``, else ``~/.cache/nbbatch``;
    an unwritable cache directory just disables caching.

    Args:
        num_samples: Total number of samples before the split; mnist1d makes
            ``num_samples // 10`` per class, so use a multiple of 10.
        train_split: Fraction of samples in the training set, in (0, 1).
        seed: Generator seed; the same seed gives identical tensors.
        cache_dir: Directory for the ``.npz`` cache (``None``: see above).

    Returns:
        A :class:`DataBundle` with x float32 ``(N, 40)`` and y int64 ``(N,)``, 10 classes.

    Example:
        >>> data = mnist1d()
        >>> data
        mnist1d: 4000 train / 1000 test, 40 features, 10 classes
        >>> mnist1d(num_samples=1000).n_train
        800
    """
    num_samples = check_int("num_samples", num_samples, minimum=10)
    train_split = _check_float("train_split", train_split, 0.0, 1.0, low_open=True, high_open=True)
    seed = _check_seed(seed)
    total = 10 * (num_samples // 10)
    n_train = int(total * train_split)  # the split make_dataset uses
    if n_train < 1 or n_train >= total:
        raise ValueError(
            f"num_samples={num_samples} with train_split={train_split} leaves an empty train or "
            f"test set ({n_train} train / {total - n_train} test); raise num_samples or move train_split"
        )
    path = _cache_path(_cache_dir(cache_dir), f"mnist1d_n{num_samples}_split{train_split!r}_seed{seed}",
                       "mnist1d.data.make_dataset", "mnist1d", num_samples=num_samples, train_split=train_split, seed=seed)
    arrays = _cached(path, lambda: _make_mnist1d(num_samples, train_split, seed))
    x_train, y_train = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    x_test, y_test = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
    return DataBundle(
        x_train, y_train, x_test, y_test,
        num_classes=10,
        description=_describe("mnist1d", x_train, x_test, 10),
        spec={"name": "mnist1d", "kwargs": {"num_samples": num_samples, "train_split": train_split, "seed": seed}},
    )


# ---------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------


def _make_digits(test_fraction: float, seed: int) -> dict:
    from sklearn.datasets import load_digits  # lazy: sklearn (and scipy) are slow and large to import
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # Stratify so every class keeps its share in both splits, even for small test sets.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    # 16 is the largest pixel value in load_digits (4x4 blocks of 0/1 pixels summed).
    return {
        "x": np.ascontiguousarray(x_tr / 16.0, dtype=np.float32),
        "y": np.ascontiguousarray(y_tr, dtype=np.int64),
        "x_test": np.ascontiguousarray(x_te / 16.0, dtype=np.float32),
        "y_test": np.ascontiguousarray(y_te, dtype=np.int64),
    }


def digits(test_fraction: float = 0.2, seed: int = 0, cache_dir: Optional[PathLike] = None) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped offline).

    Pixels are scaled from 0..16 to [0, 1] and flattened to 64 features; the
    train/test split is stratified by class and seeded. The split is cached as ``.npz`` like
    :func:`mnist1d`'s data (keyed on the arguments and scikit-learn's version), so a kernel
    that finds it does not import scikit-learn and scipy at all.

    Args:
        test_fraction: Fraction of samples in the test set, in (0, 1).
        seed: Seed of the split.
        cache_dir: Directory for the ``.npz`` cache (``None``: ``$NBBATCH_CACHE``, else
            ``~/.cache/nbbatch``).

    Returns:
        A :class:`DataBundle`, x float32 ``(N, 64)``, y int64, 10 classes.

    Example:
        >>> digits()
        digits: 1437 train / 360 test, 64 features, 10 classes
    """
    test_fraction = _check_float("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    seed = _check_seed(seed)
    path = _cache_path(_cache_dir(cache_dir), f"digits_test{test_fraction!r}_seed{seed}",
                       "sklearn.datasets.load_digits", "scikit-learn", test_fraction=test_fraction, seed=seed)
    arrays = _cached(path, lambda: _make_digits(test_fraction, seed))
    x_train, y_train = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    x_test, y_test = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
    return DataBundle(
        x_train, y_train, x_test, y_test,
        num_classes=10,
        description=_describe("digits", x_train, x_test, 10),
        spec={"name": "digits", "kwargs": {"test_fraction": test_fraction, "seed": seed}},
    )


# ---------------------------------------------------------------------------
# Synthetic problems with known answers
# ---------------------------------------------------------------------------


def linear_regression(
    n_train: int = 2048,
    n_test: int = 512,
    dim: int = 10,
    noise: float = 0.5,
    seed: int = 0,
) -> DataBundle:
    """Linear regression with Gaussian inputs: ``y = x @ w_true + noise * eps``.

    ``x ~ N(0, I)`` and ``eps ~ N(0, 1)``, so for the loss ``0.5 * (x @ w - y)**2`` the
    gradient at ``w`` has mean ``w - w_true`` and known covariance; the best possible
    test MSE is ``noise**2``. ``w_true ~ N(0, I)`` is drawn first, so it does not
    depend on ``n_train`` or ``n_test``.

    Args:
        n_train: Number of training samples.
        n_test: Number of test samples.
        dim: Input dimension.
        noise: Standard deviation of the label noise, >= 0.
        seed: Seed of the private generator (global RNGs are untouched).

    Returns:
        A :class:`DataBundle` with float32 targets ``(N,)``, ``num_classes=None`` and
        ``info = {"w_true": Tensor (dim,), "noise": float}``.

    Example:
        >>> data = linear_regression(n_train=1000, dim=5, noise=0.1)
        >>> data
        linear_regression: 1000 train / 512 test, 5 features, regression
        >>> data.info["w_true"].shape
        torch.Size([5])
    """
    n_train = check_int("n_train", n_train)
    n_test = check_int("n_test", n_test)
    dim = check_int("dim", dim)
    noise = _check_float("noise", noise, 0.0, math.inf, low_open=False, high_open=True)
    seed = _check_seed(seed)
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=g)
    x_train = torch.randn(n_train, dim, generator=g)
    x_test = torch.randn(n_test, dim, generator=g)
    y_train = x_train @ w_true + noise * torch.randn(n_train, generator=g)
    y_test = x_test @ w_true + noise * torch.randn(n_test, generator=g)
    return DataBundle(
        x_train, y_train, x_test, y_test,
        num_classes=None,
        description=_describe("linear_regression", x_train, x_test, None),
        spec={
            "name": "linear_regression",
            "kwargs": {"n_train": n_train, "n_test": n_test, "dim": dim, "noise": noise, "seed": seed},
        },
        info={"w_true": w_true, "noise": noise},
    )


def teacher_student(
    n_train: int = 4096,
    n_test: int = 1024,
    dim: int = 20,
    num_classes: int = 10,
    hidden: int = 32,
    seed: int = 0,
) -> DataBundle:
    """Classification labelled by a fixed random two-layer tanh teacher network.

    ``x ~ N(0, I)`` and ``y = argmax(tanh(x @ w1 + b1) @ w2)`` with
    ``w1 ~ N(0, 1/dim)``, ``b1 ~ N(0, 0.1**2)``, ``w2 ~ N(0, 1/hidden)``; the labels
    are noise-free, so a large enough student can reach 100% accuracy.

    Args:
        n_train: Number of training samples.
        n_test: Number of test samples.
        dim: Input dimension.
        num_classes: Number of classes (>= 2).
        hidden: Width of the teacher's hidden layer.
        seed: Seed of the private generator (global RNGs are untouched).

    Returns:
        A :class:`DataBundle` with ``info = {"w1": (dim, hidden), "b1": (hidden,),
        "w2": (hidden, num_classes)}``.

    Example:
        >>> teacher_student(n_train=512, n_test=128)
        teacher_student: 512 train / 128 test, 20 features, 10 classes
    """
    n_train = check_int("n_train", n_train)
    n_test = check_int("n_test", n_test)
    dim = check_int("dim", dim)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    hidden = check_int("hidden", hidden)
    seed = _check_seed(seed)
    g = torch.Generator().manual_seed(seed)
    # 1/sqrt(fan_in) scales keep pre-activations O(1): tanh neither saturates nor
    # stays linear, and the classes come out roughly balanced.
    w1 = torch.randn(dim, hidden, generator=g) / math.sqrt(dim)
    b1 = 0.1 * torch.randn(hidden, generator=g)
    w2 = torch.randn(hidden, num_classes, generator=g) / math.sqrt(hidden)
    x_train = torch.randn(n_train, dim, generator=g)
    x_test = torch.randn(n_test, dim, generator=g)

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ w1 + b1) @ w2).argmax(dim=1)

    return DataBundle(
        x_train, teacher(x_train), x_test, teacher(x_test),
        num_classes=num_classes,
        description=_describe("teacher_student", x_train, x_test, num_classes),
        spec={
            "name": "teacher_student",
            "kwargs": {
                "n_train": n_train, "n_test": n_test, "dim": dim,
                "num_classes": num_classes, "hidden": hidden, "seed": seed,
            },
        },
        info={"w1": w1, "b1": b1, "w2": w2},
    )


# ---------------------------------------------------------------------------
# IDX (MNIST-format) files
# ---------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _check_path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    return Path(value).expanduser()


def read_idx(path: PathLike) -> torch.Tensor:
    """Read one MNIST-format IDX file (plain or gzip-compressed) into a tensor.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then each
    dimension as a big-endian uint32; the data follow in big-endian order.
    Compression is detected from the file's content, not its name.

    Args:
        path: The file, e.g. ``"mnist/train-images-idx3-ubyte.gz"``.

    Returns:
        A CPU tensor with the declared shape and dtype (native byte order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic number, truncated file or trailing bytes.

    Example:
        >>> images = read_idx("mnist/train-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([60000, 28, 28]), torch.uint8)
    """
    path = _check_path("path", path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file, {len(raw)} bytes is shorter than the 4-byte magic number")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type code TT in "
            f"{{08, 09, 0b, 0c, 0d, 0e}} and DD >= 1 dimensions. Is this an IDX file?"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header, {ndim} dimensions need {header_len} bytes, got {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header_len
    if got < expected:
        raise ValueError(f"{path}: truncated IDX file, shape {dims} needs {expected} data bytes, got {got}")
    if got > expected:
        raise ValueError(f"{path}: {got - expected} unexpected trailing bytes after the IDX data of shape {dims}")
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header_len).reshape(dims)
    # astype to native order copies the read-only buffer into a writable array torch can own.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


_IDX_STANDARD_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _images_to_float(images: torch.Tensor, path: Path) -> torch.Tensor:
    if images.dim() < 2:
        raise ValueError(f"{path}: images must have at least 2 dimensions (N, ...), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        # uint8 pixels 0..255 -> [0, 1], the usual MNIST input range.
        return images.reshape(len(images), -1).to(torch.float32) / 255.0
    if images.dtype.is_floating_point:
        return images.reshape(len(images), -1).to(torch.float32)
    raise ValueError(f"{path}: images must be uint8 or floating point, got {images.dtype}")


def _labels_to_int(labels: torch.Tensor, path: Path) -> torch.Tensor:
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"{path}: labels must be a 1-D integer IDX file, got {labels.dtype} shape {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0, got minimum {int(labels.min())}")
    return labels


def idx_dataset(
    directory: Optional[PathLike] = None,
    *,
    train_images: Optional[PathLike] = None,
    train_labels: Optional[PathLike] = None,
    test_images: Optional[PathLike] = None,
    test_labels: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
) -> DataBundle:
    """Load an MNIST-format dataset (MNIST, Fashion-MNIST, KMNIST, ...) from IDX files on disk.

    Give a ``directory`` holding the standard names (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
    each with or without ``.gz``), or the four paths explicitly; explicit paths
    win over the standard names. Nothing is downloaded.

    Args:
        directory: Folder with the standard file names.
        train_images, train_labels, test_images, test_labels: Explicit file paths.
        num_classes: Number of classes; default ``max label + 1``.

    Returns:
        A :class:`DataBundle`: uint8 images become float32 in [0, 1], flattened to
        ``(N, H*W)``; labels int64.

    Raises:
        FileNotFoundError: naming every file that is missing.

    Example:
        >>> fashion = idx_dataset("~/data/fashion-mnist")  # doctest: +SKIP
        >>> fashion  # doctest: +SKIP
        idx (fashion-mnist): 60000 train / 10000 test, 784 features, 10 classes
    """
    given = {"train_images": train_images, "train_labels": train_labels,
             "test_images": test_images, "test_labels": test_labels}
    paths: dict[str, Path] = {}
    missing: list[str] = []
    root = _check_path("directory", directory) if directory is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"directory {str(root)!r} does not exist or is not a directory")
    for key, value in given.items():
        if value is not None:
            path = _check_path(key, value)
            if not path.is_file():
                missing.append(f"{key}={str(path)!r}")
            paths[key] = path
        elif root is not None:
            stem = _IDX_STANDARD_NAMES[key]
            found = [root / name for name in (stem, stem + ".gz") if (root / name).is_file()]
            if found:
                paths[key] = found[0]  # the uncompressed file if both exist: faster to read
            else:
                missing.append(f"{key} ({stem} or {stem}.gz in {str(root)!r})")
        else:
            missing.append(f"{key} (no path given and no directory)")
    if missing:
        raise FileNotFoundError("idx_dataset could not find: " + "; ".join(missing))
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes)

    x_train = _images_to_float(read_idx(paths["train_images"]), paths["train_images"])
    y_train = _labels_to_int(read_idx(paths["train_labels"]), paths["train_labels"])
    x_test = _images_to_float(read_idx(paths["test_images"]), paths["test_images"])
    y_test = _labels_to_int(read_idx(paths["test_labels"]), paths["test_labels"])
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise ValueError(
                f"{split}_images ({paths[f'{split}_images']}) has {len(x)} images but "
                f"{split}_labels ({paths[f'{split}_labels']}) has {len(y)} labels"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"train_images and test_images differ in image size: {x_train.shape[1]} vs {x_test.shape[1]} pixels"
        )
    max_label = int(torch.cat([y_train, y_test]).max()) if len(y_train) + len(y_test) else -1
    if num_classes is None:
        num_classes = max_label + 1
    elif num_classes <= max_label:
        raise ValueError(f"num_classes={num_classes} is too small: the labels go up to {max_label}")
    label = (root or paths["train_images"].parent).resolve().name
    return DataBundle(
        x_train, y_train, x_test, y_test,
        num_classes=num_classes,
        description=_describe(f"idx ({label})", x_train, x_test, num_classes),
        # Resolved absolute paths, so the spec rebuilds the data from any working directory.
        spec={"name": "idx", "kwargs": {**{k: str(p.resolve()) for k, p in paths.items()}, "num_classes": num_classes}},
    )


# ---------------------------------------------------------------------------
# By name / by spec
# ---------------------------------------------------------------------------


def _loaders() -> dict:
    return {
        "mnist1d": mnist1d,
        "digits": digits,
        "linear_regression": linear_regression,
        "teacher_student": teacher_student,
        "idx": idx_dataset,
    }


def load_dataset(name_or_spec: Union[str, dict], **kwargs: Any) -> DataBundle:
    """Build a dataset by name, or rebuild one from its ``spec``.

    Args:
        name_or_spec: One of :data:`DATASETS`, or a ``{"name": ..., "kwargs": {...}}``
            dict such as ``bundle.spec``.
        **kwargs: Arguments of the loader; with a spec they override its ``kwargs``.

    Returns:
        The :class:`DataBundle`.

    Example:
        >>> data = load_dataset("mnist1d", num_samples=2000)
        >>> data.n_train
        1600
        >>> torch.equal(load_dataset(data.spec).x_train, data.x_train)
        True
    """
    if isinstance(name_or_spec, dict):
        unknown = set(name_or_spec) - {"name", "kwargs"}
        if unknown or "name" not in name_or_spec:
            raise ValueError(
                f"name_or_spec as a dict must have a 'name' and optional 'kwargs', got keys {sorted(name_or_spec)}"
            )
        spec_kwargs = name_or_spec.get("kwargs") or {}
        if not isinstance(spec_kwargs, dict):
            raise TypeError(f"name_or_spec['kwargs'] must be a dict, got {spec_kwargs!r}")
        name = name_or_spec["name"]
        kwargs = {**spec_kwargs, **kwargs}
    else:
        name = name_or_spec
    if not isinstance(name, str):
        raise TypeError(f"name_or_spec must be a dataset name (str) or a spec dict, got {name!r}")
    loaders = _loaders()
    key = name.lower()
    if key not in loaders:
        raise ValueError(f"unknown dataset name {name!r}; known names: {', '.join(DATASETS)}")
    return loaders[key](**kwargs)
