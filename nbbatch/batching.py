"""Where a Trainer's batches come from: device-resident tensors, a map-style Dataset, or a DataLoader.

Every source answers the same question, "the batches of epoch ``e`` from example ``p`` on", so a
run can stop anywhere and resume at exactly the same batch. The position is counted in examples,
not batches, so it means the same thing when the batch size changes (a ``BatchSchedule``). The order of an epoch is a seeded
permutation that depends only on ``(seed, epoch)``; it is drawn on the CPU and moved to the
training device once per epoch, so CPU and GPU runs see the same batches.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .schedules import BatchSchedule

_SEED_STRIDE = 1_000_003  # a prime: epochs of nearby seeds do not share permutations


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch`` (CPU int64 tensor).

    Example:
        >>> bool((epoch_permutation(5, 0, 1) == epoch_permutation(5, 0, 1)).all())
        True
    """
    g = torch.Generator()
    g.manual_seed((seed * _SEED_STRIDE + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in one epoch of ``n`` examples."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_bounds(n: int, batch_size: int, drop_last: bool, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(first, end)`` positions of the batches of an epoch of ``n`` examples from position ``start``.

    Example:
        >>> list(batch_bounds(10, 4, False)), list(batch_bounds(10, 4, True, start=4))
        ([(0, 4), (4, 8), (8, 10)], [(4, 8)])
    """
    for lo in range(start, n, batch_size):
        hi = min(lo + batch_size, n)
        if drop_last and hi - lo < batch_size:
            return
        yield lo, hi


class _Scheduled:
    """The batch size of each epoch, for a source whose batch size may follow a ``BatchSchedule``."""

    n: int
    batch_size: int
    drop_last: bool
    schedule: BatchSchedule | None = None

    def batch_size_at(self, epoch: int) -> int:
        """The batch size of ``epoch``."""
        return self.batch_size if self.schedule is None else self.schedule(epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps in ``epoch``."""
        return num_batches(self.n, self.batch_size_at(epoch), self.drop_last)

    def steps_left(self, epoch: int, start: int) -> int:
        """Optimizer steps of ``epoch`` from example ``start`` on."""
        return sum(1 for _ in batch_bounds(self.n, self.batch_size_at(epoch), self.drop_last, start))


class TensorBatches(_Scheduled):
    """In-memory tensors, moved to the training device once, sliced by index each step.

    With ``on_device=False`` on a CUDA device the tensors stay in pinned host memory and each
    batch is copied without blocking (for datasets larger than the device). With a ``schedule``
    the batch size of each epoch is ``schedule(epoch)`` (``batch_size`` is its first).
    """

    kind = "tensors"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                 drop_last: bool, seed: int, on_device: bool = True, schedule: BatchSchedule | None = None):
        self.n = len(x)
        self.schedule = schedule
        self.device = device
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.on_device = on_device or device.type == "cpu"
        if self.on_device:
            self.x, self.y = x.to(device), y.to(device)
        else:
            self.x, self.y = x.cpu(), y.cpu()
            if device.type == "cuda":
                self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.steps_per_epoch = num_batches(self.n, batch_size, drop_last)
        self._perm_key = None   # (seed, epoch) of the cached permutation: a new seed on resume invalidates it
        self._perm = None

    def whole(self):
        """All training examples, for an evaluation pass."""
        return self.x, self.y

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_key != (self.seed, epoch):
            perm = epoch_permutation(self.n, self.seed, epoch)
            self._perm = perm.to(self.x.device)
            self._perm_key = (self.seed, epoch)
        return self._perm

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from example ``start`` of its permutation on."""
        perm = self.permutation(epoch)
        x, y, copy = self.x, self.y, not self.on_device
        for lo, hi in batch_bounds(self.n, self.batch_size_at(epoch), self.drop_last, start):
            idx = perm[lo:hi]
            if copy:
                # A host-side gather is unpinned; pin it so the copy to the device can overlap.
                yield (x[idx].pin_memory().to(self.device, non_blocking=True),
                       y[idx].pin_memory().to(self.device, non_blocking=True))
            else:
                yield x[idx], y[idx]


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class DatasetBatches(_Scheduled):
    """A map-style ``Dataset`` read through a ``DataLoader`` in the seeded epoch order."""

    kind = "dataset"

    def __init__(self, dataset: Dataset, device: torch.device, batch_size: int, drop_last: bool, seed: int,
                 schedule: BatchSchedule | None = None):
        self.dataset = dataset
        self.schedule = schedule
        self.n = len(dataset)
        self.device = device
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.steps_per_epoch = num_batches(self.n, batch_size, drop_last)

    def whole(self):
        return self.dataset

    def batches(self, epoch: int, start: int = 0):
        """The batches of ``epoch`` from example ``start`` of its permutation on."""
        order = epoch_permutation(self.n, self.seed, epoch).tolist()
        index_batches = [order[lo:hi] for lo, hi in batch_bounds(self.n, self.batch_size_at(epoch), self.drop_last, start)]
        loader = DataLoader(self.dataset, batch_sampler=_ListSampler(index_batches),
                            pin_memory=self.device.type == "cuda")
        for xb, yb in loader:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


class FixedBatchSize:
    """The position arithmetic of a source whose batches all have ``batch_size`` examples
    (``steps_per_epoch`` of them), the last of an epoch excepted."""

    def batch_size_at(self, epoch: int) -> int:
        return self.batch_size

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps_per_epoch

    def steps_left(self, epoch: int, start: int) -> int:
        return max(self.steps_per_epoch - -(-start // self.batch_size), 0)


class LoaderBatches(FixedBatchSize):
    """A user's ``DataLoader``, used as it is: its batches are the optimizer batches.

    Resuming mid-epoch skips the batches already used; the order matches the interrupted run
    only when the loader's own shuffling is seeded. Its batch size cannot follow a schedule.
    """

    kind = "loader"

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader = loader
        self.device = device
        self.n = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
        try:
            self.steps_per_epoch = len(loader)
        except TypeError as err:
            raise TypeError("data: a DataLoader without a length (an iterable dataset) is not supported; "
                            "wrap the data in a map-style Dataset or pass tensors") from err
        self.batch_size = loader.batch_size

    def whole(self):
        return self.loader

    def batches(self, epoch: int, start: int = 0):
        """The loader's batches, skipping those that end at or before example ``start``."""
        seen = 0
        for batch in self.loader:
            xb, yb = batch[0], batch[1]
            if seen < start:
                seen += len(xb)
                continue
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, y)`` when ``data`` is in memory (a pair of tensors or a TensorDataset), else None."""
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        return data.tensors[0], data.tensors[1]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    return None


def train_tensors(data, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a DataBundle (its training split), a pair of tensors or a TensorDataset.

    Raises a TypeError naming ``name`` for anything else, and a ValueError when the inputs and
    labels differ in length or there are none.

    Example:
        >>> x, y = train_tensors((torch.zeros(3, 2), torch.zeros(3)))
        >>> tuple(x.shape), tuple(y.shape)
        ((3, 2), (3,))
    """
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        x, y = data.x_train, data.y_train
    else:
        xy = as_tensors(data)
        if xy is None:
            raise TypeError(f"{name} must be a DataBundle, a pair (x, y) of tensors or a TensorDataset, "
                            f"got {type(data).__name__}")
        x, y = xy
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    return x, y
