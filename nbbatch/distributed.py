"""Data parallelism on PyTorch's own engine: ``torch.distributed`` and DistributedDataParallel.

The Trainer becomes data-parallel when it runs under ``torchrun`` (the environment variables
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` are present), inside an initialised default process
group (as in the workers of :func:`launch`), or when given ``distributed=Distributed(...)``.

What stays the same at any world size ``W``:

- ``batch_size`` is the number of examples per optimizer step across all processes. Every
  process draws the same seeded permutation of the epoch, takes the same global batch of
  indices, and keeps its own contiguous share (``batch_size / W`` rows), which it splits into
  ``accumulate`` micro-batches. So the History, the LR scaling rule and the checkpoints speak
  of the same batch whether one process or sixty-four ran it.
- Gradients are averaged by DDP's all-reduce once per optimizer step (micro-batches before the
  last run under ``no_sync``). Each micro-batch loss is weighted by ``m * W / n`` (``m`` its
  examples, ``n`` the global batch), so DDP's mean over processes is exactly the gradient of
  the mean loss over the ``n`` examples, uneven last batches included.
- The recorded loss is the all-reduced mean over the global batch; every process keeps the
  same History, makes the same stopping decisions, and evaluates the (whole) evaluation set.
- Only rank 0 runs callbacks (so prints and plots appear once) and writes checkpoints. A
  checkpoint holds the plain model (no ``module.`` prefix) and global progress, so it resumes
  on any world size.
- Building a Trainer (and ``Trainer.load``) is collective: every rank must do it, with the same
  configuration, model and data (checked; rank 0 reports differences). For a trainer that lives
  on one rank only, pass ``distributed=False``.

Batch normalisation: by default each process normalises over its own share of the batch
(``batch_size / W`` examples, a ghost-batch-like statistic; rank 0's running statistics are
broadcast to the others at every forward, DDP's default). ``Distributed(sync_batchnorm=True)``
converts BN layers to ``torch.nn.SyncBatchNorm`` (statistics over the whole global batch);
PyTorch implements that for CUDA devices only.

:func:`launch` starts local worker processes from a notebook; the function is serialised with
``cloudpickle`` because a function defined in a notebook cell lives in ``__main__``, which a
spawned worker cannot import. Written here by hand: the notebook launcher (torch's
``mp.spawn`` neither ships ``__main__`` functions nor returns results) and the sharded batch
sources; everything else is torch.distributed and DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .batching import DatasetBatches, FixedBatchSize, TensorBatches, epoch_permutation
from .norms import bn_layers

__all__ = ["Distributed", "DistContext", "LaunchError", "ReportedByRank0", "SingleProcess", "free_port",
           "launch", "rank", "world_size"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------- public helpers
def rank() -> int:
    """This process's rank in the default process group (0 when not distributed).

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default process group (1 when not distributed).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except (OSError, TypeError) as err:   # socket.gaierror for a name that does not resolve
            raise ValueError(f"host={host!r} is not an address of this machine to listen on ({err}); "
                             f"use '127.0.0.1' for local workers") from None
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    free_port(host)   # checks the host first
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ValueError(f"port={port} on {host} is already in use ({err.strerror}); "
                             f"pass another port, or port=None to pick a free one") from None


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How a Trainer runs data-parallel; pass it as ``Trainer(..., distributed=Distributed(...))``.

    Args:
        process_group: the group to train over (default: the default group, initialised from
            torchrun's environment when needed).
        sync_batchnorm: convert BatchNorm layers to ``SyncBatchNorm`` (statistics over the whole
            global batch; CUDA only). False: each process normalises over its own share.
        backend: the backend used when this call initialises the default group: ``"gloo"``
            (CPU) or ``"nccl"`` (CUDA); None picks nccl when CUDA is available, else gloo.

    Example:
        >>> Distributed(sync_batchnorm=False).backend is None
        True
    """

    process_group: Any = None
    sync_batchnorm: bool = False
    backend: str | None = None

    def __post_init__(self):
        if not isinstance(self.sync_batchnorm, bool):
            raise TypeError(f"sync_batchnorm must be True or False, got {self.sync_batchnorm!r}")
        if self.backend is not None and self.backend not in ("gloo", "nccl", "mpi"):
            raise ValueError(f"backend={self.backend!r} is not known; use 'gloo' (CPU), 'nccl' (CUDA) or None")


def _under_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def resolve(distributed) -> "DistContext | None":
    """The data-parallel context a Trainer should use, or None for a single process.

    ``distributed`` is ``"auto"`` (data-parallel when a default group of more than one process
    is initialised or torchrun's environment is present), ``False``, ``True`` (the default
    group, initialised from the environment if needed), a ``Distributed`` or a ProcessGroup.
    """
    if distributed is False or distributed is None:
        return None
    if isinstance(distributed, str):
        if distributed != "auto":
            raise ValueError(f"distributed={distributed!r} is not known; use 'auto', True, False, "
                             f"a Distributed(...) or a process group")
        if not dist.is_available():
            return None
        if not dist.is_initialized() and not _under_torchrun():
            return None
        options = Distributed()
    elif distributed is True:
        options = Distributed()
    elif isinstance(distributed, Distributed):
        options = distributed
    elif dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        options = Distributed(process_group=distributed)
    else:
        raise TypeError(f"distributed must be 'auto', True, False, a Distributed(...) or a ProcessGroup, "
                        f"got {type(distributed).__name__}")
    if not dist.is_available():
        raise RuntimeError("distributed: this build of torch has no torch.distributed")
    group = options.process_group
    if group is None and not dist.is_initialized():
        if not _under_torchrun():
            raise ValueError("distributed: no process group is initialised and this is not a torchrun worker; "
                             "start the script with torchrun, call torch.distributed.init_process_group first, "
                             "or use nbbatch.launch(...) from a notebook")
        backend = options.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    ctx = DistContext(group, options.sync_batchnorm)
    if ctx.world_size == 1 and isinstance(distributed, str):
        return None   # a group of one is a single process: keep the plain path
    return ctx


class DistContext:
    """Rank, world size and the few collectives a data-parallel Trainer needs.

    ``SingleProcess`` has the same interface for one process, so the Trainer's step reads the
    same at any world size.
    """

    data_parallel = True

    def __init__(self, group=None, sync_batchnorm: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sync_batchnorm = sync_batchnorm
        self.backend = dist.get_backend(group)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    # ---- device and checks, before the trainer changes any state
    def pick_device(self, requested, device: torch.device) -> torch.device:
        """One CUDA device per process: ``cuda:LOCAL_RANK`` unless an index was asked for."""
        if device.type == "cuda" and (not isinstance(requested, (str, torch.device)) or ":" not in str(requested)):
            index = self.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return device

    def check(self, cfg, n_train: int | None, model: torch.nn.Module, device: torch.device, source: str,
              train_xy=None) -> None:
        """Refuse a run that cannot be split sensibly, or whose ranks disagree (reported by rank 0).

        Every rank raises (none is left waiting in a collective); rank 0 raises ``ValueError``
        with the full report, the others ``ReportedByRank0``.
        """
        try:
            self._check(cfg, n_train, model, device, source, train_xy)
        except ValueError as err:
            if self.is_main or isinstance(err, ReportedByRank0):
                raise
            raise ReportedByRank0(f"{err} (rank {self.rank}; rank 0 reports the same)") from None

    def _check(self, cfg, n_train, model, device, source, train_xy) -> None:
        mine = _run_signature(cfg, n_train, model, train_xy)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        reference = gathered[0]
        diffs = []
        for r, theirs in enumerate(gathered[1:], start=1):
            for key in sorted(set(reference) | set(theirs)):
                if reference.get(key) != theirs.get(key):
                    diffs.append(f"rank {r} has {key}={theirs.get(key)!r} where rank 0 has {reference.get(key)!r}")
        if diffs:
            if self.is_main:
                raise ValueError("distributed: the processes were given different runs; every rank must build the "
                                 "same config, model and data. " + "; ".join(diffs))
            raise ReportedByRank0("distributed: this rank's run differs from rank 0's (rank 0 reports the differences)")
        W, B = self.world_size, cfg.batch_size
        if source == "loader":
            raise ValueError("data: a DataLoader's batches cannot be split across processes; pass tensors, a "
                             "DataBundle or a map-style Dataset (each process then reads only its share)")
        if cfg.batch_schedule is not None:
            raise ValueError(f"batch_schedule={cfg.batch_schedule!r}: a changing batch size is not offered "
                             f"data-parallel; train with one process, or leave batch_schedule at None")
        if B < W:
            raise ValueError(f"batch_size={B} gives each of the {W} processes fewer than one example "
                             f"(per-process batch {B}/{W} < 1); use batch_size >= {W}")
        if B % W:
            raise ValueError(f"batch_size={B} does not split evenly over world_size={W} processes; use a multiple "
                             f"of {W} (e.g. {B - B % W} or {B - B % W + W}) so every process takes batch_size/{W}")
        if B // W < cfg.accumulate:
            raise ValueError(f"accumulate={cfg.accumulate} splits the per-process batch of {B // W} examples "
                             f"(batch_size={B} / world_size={W}) into micro-batches of fewer than one example; "
                             f"use accumulate <= {B // W}")
        if n_train is not None and not cfg.drop_last:
            last = n_train % B
            if 0 < last < W:
                raise ValueError(f"the last batch of each epoch holds {last} example(s) ({n_train} % {B}), fewer than "
                                 f"the {W} processes; use drop_last=True or a batch size that leaves >= {W}")
        if self.sync_batchnorm and device.type != "cuda" and bn_layers(model):
            raise ValueError("distributed: sync_batchnorm=True needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                             "kernel); on the CPU leave it False: each process normalises over its own share")

    def shared_seed(self, seed: int) -> int:
        """Rank 0's data seed, so every rank draws the same permutation (matters when unseeded)."""
        box = [seed]
        dist.broadcast_object_list(box, src=self._global_rank(0), group=self.group)
        return int(box[0])

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    # ---- building
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The DDP module the training forward goes through (the plain model stays the one saved)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids, process_group=self.group)
        self._extra = self._reduced = None
        net.register_comm_hook(self, _allreduce_hook)
        return net

    def convert_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.sync_batchnorm:
            return model
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=self.group)

    def shard(self, source):
        """Wrap a batch source so it yields this rank's share of each global batch."""
        if isinstance(source, TensorBatches):
            return ShardedTensorBatches(source, self.rank, self.world_size)
        if isinstance(source, DatasetBatches):
            return ShardedDatasetBatches(source, self.rank, self.world_size)
        raise TypeError(f"cannot shard a {type(source).__name__}")

    # ---- in the step
    def global_batch_size(self, source, xb: torch.Tensor) -> int:
        """``n``, the examples in the global batch whose share ``xb`` is (the last one may be short)."""
        return source.last_global_n

    def sync_context(self, net, last: bool):
        """DDP all-reduces gradients only in the backward of the last micro-batch."""
        return _NO_SYNC if last else net.no_sync()

    def shared_generator(self, seed: int, step: int, device: torch.device) -> torch.Generator:
        """A generator seeded by the ranks' shared seed and the step: the same draws on every rank.

        Every rank must add the same gradient noise to the same all-reduced gradients, whatever
        its global generator did (unseeded, or dropout on uneven shards).
        """
        seed = ((seed << 32) + step) % (1 << 63)   # any int seed, in manual_seed's range
        return torch.Generator(device).manual_seed(seed)

    def attach(self, total: torch.Tensor, stop: bool) -> None:
        """Before the last backward: this rank's weighted loss sum and stop flag, for the all-reduce."""
        flag = torch.ones(1, device=total.device) if stop else torch.zeros(1, device=total.device)
        self._extra = torch.cat([total.detach().float().reshape(1), flag])
        self._reduced = None

    def collect(self) -> tuple[torch.Tensor, bool]:
        """After the backward: the global batch's mean loss, and whether any rank asked to stop.

        Each rank's weighted sum is ``W/n * sum of its losses``, so the mean over ranks is the
        mean loss over the global batch. Normally these two numbers travelled in the last
        gradient bucket's all-reduce (see ``_allreduce_hook``); else one small all-reduce here.
        """
        reduced = self._reduced
        if reduced is None:
            reduced = self._extra / self.world_size
            dist.all_reduce(reduced, group=self.group)
        self._extra = self._reduced = None
        return reduced[:1], bool(reduced[1].item() > 0)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


_NO_SYNC = contextlib.nullcontext()   # reusable: entering it does nothing


class SingleProcess:
    """``DistContext``'s interface for one process: rank 0 of 1, and every collective a no-op.

    The Trainer holds one of these when it does not run data-parallel, so its construction and
    its step call the same methods at any world size, at the cost of a few no-op calls per step.

    Example:
        >>> ctx = SingleProcess()
        >>> ctx.rank, ctx.world_size, ctx.is_main, ctx.data_parallel
        (0, 1, True, False)
        >>> ctx.attach(torch.tensor(0.5), stop=False)
        >>> ctx.collect()
        (tensor(0.5000), False)
    """

    data_parallel = False
    group = None
    rank = local_rank = 0
    world_size = 1
    is_main = True

    def __init__(self):
        self._total: torch.Tensor | None = None

    def __repr__(self) -> str:
        return "SingleProcess()"

    # ---- device and checks: nothing to agree on
    def pick_device(self, requested, device: torch.device) -> torch.device:
        return device

    def check(self, cfg, n_train: int | None, model: torch.nn.Module, device: torch.device, source: str,
              train_xy=None) -> None:
        pass

    def shared_seed(self, seed: int) -> int:
        return seed

    # ---- building: the model, its batch source and the forward module stay as they are
    def convert_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model

    def shard(self, source):
        return source

    # ---- in the step
    def global_batch_size(self, source, xb: torch.Tensor) -> int:
        return xb.shape[0]

    def sync_context(self, net, last: bool):
        return _NO_SYNC

    def shared_generator(self, seed: int, step: int, device: torch.device) -> None:
        return None   # the global generator, as any single-process draw

    def attach(self, total: torch.Tensor, stop: bool) -> None:
        self._total = total

    def collect(self) -> tuple[torch.Tensor, bool]:
        """The loss ``attach`` was given, and no stop (one process stops between steps)."""
        total, self._total = self._total, None
        return total, False

    def barrier(self) -> None:
        pass


def _allreduce_hook(ctx: DistContext, bucket):
    """DDP's averaging all-reduce, with the step's loss and stop flag appended to the last bucket.

    The Trainer records the global batch's loss and stops all ranks at the same step; carrying
    both in the gradient all-reduce saves a second collective per step (a few milliseconds of
    latency on a CPU, as much as a small model's whole step).
    """
    buf = bucket.buffer()
    extra = ctx._extra if bucket.is_last() else None
    t = buf if extra is None else torch.cat([buf, extra.to(buf.dtype)])
    t.div_(ctx.world_size)
    fut = dist.all_reduce(t, group=ctx.group, async_op=True).get_future()
    if extra is None:
        return fut.then(lambda f: f.value()[0])
    n = buf.numel()

    def unpack(f):
        out = f.value()[0]
        ctx._reduced = out[n:].float()    # [mean loss, (stop requests) / W]
        return out[:n]
    return fut.then(unpack)


class StopAgreed(Exception):
    """Raised inside a data-parallel step when some rank asked to stop; no rank applies the update."""


class ReportedByRank0(ValueError):
    """A check failed on a rank other than 0; rank 0 raises the same check with the full report."""


def _run_signature(cfg, n_train, model, train_xy=None) -> dict:
    d = cfg.to_dict()
    d.pop("device", None)          # ranks may sit on different devices of one kind
    d["n_train"] = n_train
    d["model"] = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    if train_xy is not None:       # in-memory data: a cheap fingerprint (sums), so every rank shards the same set
        d["train_data_sums"] = tuple(float(f"{float(t.detach().double().sum()):.10g}") for t in train_xy)
    return d


# ---------------------------------------------------------------------- sharded batch sources
def _share(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    # Contiguous shares; sizes differ by at most one for an uneven (last) batch.
    return idx.tensor_split(world)[rank]


class _Shard(FixedBatchSize):
    """This rank's share of each global batch of an inner batch source (same seed, same epochs)."""

    def __init__(self, inner, rank: int, world: int):
        self.inner, self.rank, self.world = inner, rank, world
        self.n, self.batch_size, self.steps_per_epoch = inner.n, inner.batch_size, inner.steps_per_epoch
        self.last_global_n = None   # the size of the global batch the latest share came from

    @property
    def seed(self):   # the trainer sets it on resume
        return self.inner.seed

    @seed.setter
    def seed(self, value):
        self.inner.seed = value

    def whole(self):
        return self.inner.whole()


class ShardedTensorBatches(_Shard):
    """In-memory tensors: the global batch's indices, then this rank's share (rows gathered locally)."""

    kind = "tensors"

    def batches(self, epoch: int, start: int = 0):
        inner = self.inner
        perm = inner.permutation(epoch)
        B = inner.batch_size
        for i in range(start // B, inner.steps_per_epoch):   # start: a position in examples, a multiple of B
            idx = perm[i * B:(i + 1) * B]
            self.last_global_n = len(idx)
            mine = _share(idx, self.rank, self.world)
            if inner.on_device:
                yield inner.x[mine], inner.y[mine]
            else:
                yield (inner.x[mine].pin_memory().to(inner.device, non_blocking=True),
                       inner.y[mine].pin_memory().to(inner.device, non_blocking=True))


class ShardedDatasetBatches(_Shard):
    """A map-style Dataset: each rank reads only its share of each global batch."""

    kind = "dataset"

    def batches(self, epoch: int, start: int = 0):
        from torch.utils.data import default_collate

        inner = self.inner
        perm = epoch_permutation(inner.n, inner.seed, epoch)
        B = inner.batch_size
        for i in range(start // B, inner.steps_per_epoch):   # start: a position in examples, a multiple of B
            idx = perm[i * B:(i + 1) * B]
            self.last_global_n = len(idx)
            items = [inner.dataset[j] for j in _share(idx, self.rank, self.world).tolist()]
            xb, yb = default_collate(items)[:2]
            yield xb.to(inner.device, non_blocking=True), yb.to(inner.device, non_blocking=True)


# ---------------------------------------------------------------------- the notebook launcher
class LaunchError(RuntimeError):
    """A worker started by :func:`launch` raised or died; the others were stopped.

    Attributes: ``rank`` (the first failing rank), ``exitcode`` (for a death, else None) and
    ``remote_traceback`` (the worker's traceback text, for a raised exception).
    """

    def __init__(self, message: str, *, rank: int, exitcode: int | None = None, remote_traceback: str = ""):
        super().__init__(message)
        self.rank, self.exitcode, self.remote_traceback = rank, exitcode, remote_traceback



def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _rendezvous_store(host: str, port: int, rank_: int, nprocs: int, timeout: timedelta):
    """The workers' key-value store, listening on ``host`` only.

    Given a host, torch's own TCP store still listens on every interface of the machine, so
    anyone who can reach the port could join or disturb the group. Rank 0 binds the socket to
    ``host`` itself (the loopback address by default) and hands it to the store.
    """
    if rank_ != 0:
        return dist.TCPStore(host, port, nprocs, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, nprocs))
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore(host, port, nprocs, True, timeout, master_listen_fd=sock.detach())


def _worker(payload: bytes, rank_: int, nprocs: int, host: str, port: int, backend: str, threads: int | None,
            timeout_s: float, results) -> None:
    import cloudpickle

    out = io.StringIO()
    os.environ.update({"MASTER_ADDR": host, "MASTER_PORT": str(port), "RANK": str(rank_),
                       "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank_), "LOCAL_WORLD_SIZE": str(nprocs)})
    loopback = _loopback_interface()
    if host in ("127.0.0.1", "localhost") and loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback   # gloo's own connections stay on this machine too
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        fn, args, kwargs = cloudpickle.loads(payload)
        if backend == "nccl":
            torch.cuda.set_device(rank_ % torch.cuda.device_count())
        store = _rendezvous_store(host, port, rank_, nprocs, timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank_, world_size=nprocs,
                                timeout=timedelta(seconds=timeout_s))
        with contextlib.redirect_stdout(out):
            value = fn(*args, **kwargs)
        try:
            data = cloudpickle.dumps((rank_, "ok", value, out.getvalue(), False))
        except Exception as err:
            data = cloudpickle.dumps((rank_, "error", f"the result of rank {rank_} cannot be pickled: {err!r}",
                                      out.getvalue(), False))
    except BaseException as err:  # everything goes back to the notebook, with the worker's traceback
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        echo = isinstance(err, ReportedByRank0) or isinstance(err, getattr(dist, "DistError", ReportedByRank0))
        data = cloudpickle.dumps((rank_, "error", text, out.getvalue(), echo))
    # Report before leaving the group: closing it makes the peers' collectives fail, and their
    # (echo) errors should not arrive first.
    results.put(data)
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def launch(fn: Callable, nprocs: int = 2, *, args: Sequence = (), kwargs: dict | None = None,
           backend: str | None = None, host: str = "127.0.0.1", port: int | None = None,
           threads: int | None = 1, timeout: float | None = 600.0, start_method: str = "spawn",
           print_output: str = "rank0", grace: float = 3.0) -> list:
    """Run ``fn(*args, **kwargs)`` in ``nprocs`` local worker processes and return their results.

    Each worker joins a process group (``torch.distributed``) before ``fn`` runs, so a Trainer
    built inside ``fn`` trains data-parallel over the workers. ``fn`` may be defined in a
    notebook cell (it is shipped with cloudpickle). What rank 0 printed is printed here. The
    workers are daemon processes (they end with this one), so ``fn`` cannot start processes of
    its own (for example DataLoader workers).

    Args:
        fn: the function each worker runs; its return value (picklable) comes back.
        nprocs: number of worker processes (the world size).
        args, kwargs: passed to ``fn`` in every worker.
        backend: ``"gloo"`` (default) or ``"nccl"`` (one CUDA device per worker).
        host, port: where rank 0's rendezvous store listens (``port=None``: a free port). The
            default, the loopback address, keeps the group closed to other machines; another
            address (an interface's, or ``"0.0.0.0"`` for all) lets anyone who can reach the port connect.
        threads: ``torch.set_num_threads`` in each worker (None: torch's default).
        timeout: seconds before the run is stopped (None: no limit); also the collectives' timeout.
        start_method: ``"spawn"`` (default, safe everywhere) or ``"fork"`` (faster, Linux, no CUDA).
        print_output: ``"rank0"``, ``"all"`` or ``"none"``: which workers' printed text to show.
        grace: seconds the other workers get to finish after one fails, before they are stopped.

    Returns:
        the results, ordered by rank.

    Raises:
        LaunchError: a worker raised (its traceback is in the message) or died; the others are
            stopped and nothing is left running.
        ValueError: bad arguments or a port already in use. RuntimeError: ``start_method="fork"``
            after CUDA was initialised in this process (forked workers would hang).
        TimeoutError: the run took longer than ``timeout``.

    Example:
        >>> def hello():
        ...     import torch.distributed as dist
        ...     return dist.get_rank(), dist.get_world_size()
        >>> launch(hello, nprocs=2)              # doctest: +SKIP
        [(0, 2), (1, 2)]
    """
    import multiprocessing as mp

    import cloudpickle

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r} is not known; use 'gloo' (CPU) or 'nccl' (CUDA)")
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"backend='nccl' needs one CUDA device per worker: nprocs={nprocs}, "
                         f"devices={torch.cuda.device_count()}")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method={start_method!r} is not known; use 'spawn', 'fork' or 'forkserver'")
    if start_method == "fork" and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("launch: CUDA is already initialised in this process, and forked workers cannot use it "
                           "(they would hang or fail). Use start_method='spawn' (the default), or restart the "
                           "kernel and launch before touching CUDA")
    if print_output not in ("rank0", "all", "none"):
        raise ValueError(f"print_output={print_output!r} is not known; use 'rank0', 'all' or 'none'")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    # Checked here, not where they are first used: grace only on a failure (where a TypeError would
    # hide the worker's error), timeout inside the workers (an infinite one overflows a timedelta).
    if timeout is not None and not (_is_real(timeout) and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a finite number of seconds > 0, or None, got {timeout!r}")
    if not (_is_real(grace) and 0 <= grace < math.inf):
        raise ValueError(f"grace must be a finite number of seconds >= 0, got {grace!r}")
    if port is None:
        port = free_port(host)
    elif isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an int in 1..65535 or None, got {port!r}")
    else:
        _check_port_free(host, port)
    try:
        payload = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})))
    except Exception as err:
        raise ValueError(f"launch: fn and its arguments must be picklable (by cloudpickle): {err}") from err

    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    collective_timeout = timeout if timeout is not None else 1800.0
    procs = [ctx.Process(target=_worker, args=(payload, r, nprocs, host, port, backend, threads,
                                               collective_timeout, results), daemon=True)
             for r in range(nprocs)]
    gathered: dict[int, tuple] = {}   # rank -> (status, value, printed, secondary)
    errors: list[int] = []            # ranks that raised, in order of arrival
    deadline = None if timeout is None else time.monotonic() + timeout
    death: LaunchError | None = None

    def receive(wait: float) -> bool:
        try:
            rank_, status, value, printed, secondary = cloudpickle.loads(results.get(timeout=wait))
        except queue_module.Empty:
            return False
        gathered[rank_] = (status, value, printed, secondary)
        if status == "error":
            errors.append(rank_)
        return True

    try:
        for p in procs:
            p.start()
        while len(gathered) < nprocs and not errors and death is None:
            if receive(0.2):
                continue
            for r, p in enumerate(procs):
                if r not in gathered and p.exitcode is not None and not receive(1.0):
                    # Gone without a result, even after its queue had a moment to flush.
                    death = LaunchError(f"rank {r} of {nprocs} died with exit code {p.exitcode} (killed or "
                                        f"crashed) before returning; the other workers were stopped",
                                        rank=r, exitcode=p.exitcode)
                    break
            if deadline is not None and time.monotonic() > deadline and not errors and death is None:
                missing = sorted(set(range(nprocs)) - set(gathered))
                raise TimeoutError(f"launch: ranks {missing} had not finished after timeout={timeout} s; "
                                   f"all workers were stopped")
        if errors or death is not None:
            # The others may be blocked in a collective that will never complete: let them
            # report for a short grace, then stop them.
            end = time.monotonic() + grace
            while time.monotonic() < end and len(gathered) < nprocs:
                if not receive(0.05) and not any(p.is_alive() for r, p in enumerate(procs) if r not in gathered):
                    break
            while receive(0.2):
                pass
            if death is None:
                # A worker that died is the cause; the others' collective errors are its echo.
                dead = [r for r, p in enumerate(procs) if r not in gathered and p.exitcode not in (None, 0)]
                if dead:
                    r = dead[0]
                    death = LaunchError(f"rank {r} of {nprocs} died with exit code {procs[r].exitcode} (killed or "
                                        f"crashed) before returning; the other workers were stopped",
                                        rank=r, exitcode=procs[r].exitcode)
    finally:
        _stop_all(procs)
        results.close()
        results.join_thread()
    if death is not None:
        raise death
    if errors:
        # The first error that is not an echo: of a failed peer (a collective's error) or of a
        # report rank 0 makes in full.
        r = next((r for r in errors if not gathered[r][3]), errors[0])
        raise LaunchError(f"rank {r} of {nprocs} raised:\n{gathered[r][1]}", rank=r, remote_traceback=gathered[r][1])
    for r in range(nprocs):
        printed = gathered[r][2]
        if printed and (print_output == "all" or (print_output == "rank0" and r == 0)):
            prefix = f"[rank {r}] " if print_output == "all" else ""
            print("".join(prefix + line for line in printed.splitlines(keepends=True)), end="")
    return [gathered[r][1] for r in range(nprocs)]


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stop_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is None:
            continue
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
