"""The Trainer's construction: every argument checked, and what the training needs prepared.

``validate`` checks every argument of ``Trainer(...)``, raising on the first problem, and
returns a ``Setup`` without changing any state; ``Trainer._build`` then applies it (the network
on the device from ``prepare_network``, the batches from ``batch_source``, the optimizer from
``build_optimizer``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..batching import DatasetBatches, LoaderBatches, TensorBatches, as_tensors
from ..config import TrainConfig
from ..device import resolve_device, resolve_precision
from ..distributed import DistContext, SingleProcess
from ..distributed import resolve as resolve_distributed
from ..losses import accuracy, resolve_loss
from ..norms import bn_layers, warn_accumulation_with_bn
from ..optim import ADAM_EPS, LAMB, LAMB_EPS, LARS, layerwise_groups
from ..recompute import check_checkpointed, checkpointed


@dataclasses.dataclass(frozen=True)
class Setup:
    """What ``validate`` checked and prepared for ``Trainer._build``; making it changed no state."""

    config: TrainConfig
    dist: DistContext | SingleProcess
    device: torch.device
    precision: str
    train_xy: tuple | None          # in-memory training tensors; None for a Dataset or a DataLoader
    eval_xy: Any
    spec: Any                       # the built-in dataset's spec, for Trainer.load
    loss_fn: Callable
    metrics: dict
    optimizer: torch.optim.Optimizer
    population: int | None          # N for the online noise scale (see _sampled_population)
    last_batch_problem: str | None  # what batch norm cannot normalise in the short last batch
    log_dir: str | os.PathLike | None
    log_checkpoint: str | None


def validate(model, data, config, eval_data, distributed, log_dir, log_checkpoints, options) -> Setup:
    """Check every argument of ``Trainer(...)``, raising on the first problem; change nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_model(model)
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
    if not isinstance(log_checkpoints, bool) or (log_checkpoints and log_dir is None):
        raise ValueError(f"log_checkpoints={log_checkpoints!r}: it must be True or False, and True needs a log_dir")
    cfg = _resolve_config(data, config, options)
    dist = resolve_distributed(distributed) or SingleProcess()
    device = dist.pick_device(cfg.device, resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device)
    train_xy, eval_xy, spec = _split_data(data, eval_data)
    n_train = len(train_xy[0]) if train_xy is not None else _length(data)
    if n_train == 0:
        raise ValueError("data: the training set is empty")
    _check_batch_schedule(cfg, data, n_train)
    if n_train is not None and cfg.batch_size > n_train:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({n_train} examples); "
                         f"use batch_size <= {n_train} (full-batch gradient descent is batch_size={n_train})")
    loss_fn = resolve_loss(cfg.loss)
    metrics = dict(cfg.metrics) if cfg.metrics is not None else (
        {"accuracy": accuracy} if cfg.loss == "cross_entropy" else {})
    sample = train_xy if train_xy is not None else _first_batch(data)
    _check_fit(model, loss_fn, cfg.loss, sample[0][:2], sample[1][:2],
               all_labels=train_xy[1] if train_xy is not None else None, metrics=metrics)
    # Batch norm that cannot normalise every batch is refused now; one that cannot normalise only
    # the short last batch of an epoch is refused by the fit or step that would reach it (before
    # it starts), so a trainer that takes a few steps stays possible. Data-parallel, each rank
    # normalises its own share: not checked here.
    every_batch, last_batch = ((None, None) if dist.data_parallel
                               else _batch_norm_problems(model, n_train, cfg, data))
    if every_batch is not None:
        raise ValueError(every_batch)
    optimizer = build_optimizer(cfg, model.parameters())   # a bad factory fails here, before any change
    check_checkpointed(model, cfg.checkpoint_segments)       # an nn.Sequential, when checkpointing
    source = "tensors" if train_xy is not None else ("loader" if isinstance(data, DataLoader) else "dataset")
    dist.check(cfg, n_train, model, device, source, train_xy)   # the split, and the agreement of all ranks
    return Setup(cfg, dist, device, precision, train_xy, eval_xy, spec, loss_fn, metrics, optimizer,
                  _sampled_population(data, n_train), last_batch, log_dir,
                  os.path.join(os.fspath(log_dir), "checkpoint.pt") if log_checkpoints else None)


def _resolve_config(data, config, options: dict) -> TrainConfig:
    """The run's TrainConfig: ``config`` (or the defaults) with ``options`` applied; a DataLoader's batch size."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if isinstance(data, DataLoader) and config is None and "batch_size" not in options:
        if data.batch_size is None:
            raise ValueError("data: a DataLoader with a batch_sampler has no fixed batch size; pass batch_size=...")
        options = {**options, "batch_size": data.batch_size}
    cfg = TrainConfig(**options) if config is None else config.replace(**options)
    if isinstance(data, DataLoader) and data.batch_size not in (None, cfg.batch_size):
        raise ValueError(f"batch_size={cfg.batch_size} differs from the DataLoader's batch_size={data.batch_size}; "
                         f"the loader's batches are the optimizer batches")
    return cfg


def warn_split_batch_norm(model: nn.Module, cfg: TrainConfig) -> None:
    # Accumulating over batch norm normalises each micro-batch on its own: say so, once. Without
    # accumulation the online noise scale splits its measured steps in two halves: the same caveat.
    # (stacklevel: this function, Trainer._build, Trainer.__init__, then the caller.)
    if cfg.accumulate == 1 and cfg.noise_scale_every is not None:
        warn_accumulation_with_bn(model, cfg.batch_size, 2, stacklevel=4,
                                  cause=f"noise_scale_every={cfg.noise_scale_every} (measured steps run as two half-batches)")
    else:
        warn_accumulation_with_bn(model, cfg.batch_size, cfg.accumulate, stacklevel=4)


def prepare_network(model: nn.Module, dist, device: torch.device, segments: int) -> tuple[nn.Module, nn.Module]:
    """The model on the device, and the module the training forward calls.

    One pipeline: batch norm converted for data parallelism (SyncBatchNorm when asked), the
    model moved to the device, activation recomputation (checkpointed chunks, ``segments >= 2``)
    and the data-parallel wrapper (DDP); the last three steps leave a single process's model as it is.
    """
    model = dist.convert_batchnorm(model)
    try:
        model = model.to(device)
    except NotImplementedError as err:   # e.g. a tensor without data that slipped past the checks
        raise ValueError(f"model: it cannot be moved to {device} ({err}); give a model whose parameters "
                         f"and buffers hold data") from err
    return model, dist.wrap(checkpointed(model, segments), device)


def batch_source(data, train_xy, device: torch.device, cfg: TrainConfig, seed: int):
    """The training batches: tensors sliced by index, a Dataset read in the seeded order, or a DataLoader."""
    if train_xy is not None:
        return TensorBatches(train_xy[0], train_xy[1], device, cfg.batch_size, cfg.drop_last, seed,
                             on_device=cfg.data_on_device, schedule=cfg.batch_schedule_value)
    if isinstance(data, DataLoader):
        return LoaderBatches(data, device)
    return DatasetBatches(data, device, cfg.batch_size, cfg.drop_last, seed, schedule=cfg.batch_schedule_value)


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    name, lr, wd = cfg.optimizer, cfg.lr, cfg.weight_decay
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum_value, nesterov=name == "nesterov", weight_decay=wd)
    adam_eps = ADAM_EPS if cfg.eps is None else cfg.eps
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=adam_eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=adam_eps, weight_decay=wd)
    if name in ("lars", "lamb"):
        # weight matrices adapted and decayed; 1-D tensors (biases, norms) neither, unless adapt_all
        groups = layerwise_groups(params, wd, cfg.adapt_all)
        if name == "lars":
            return LARS(groups, lr=lr, momentum=cfg.momentum_value, weight_decay=wd)
        return LAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=LAMB_EPS if cfg.eps is None else cfg.eps,
                    weight_decay=wd)
    try:
        opt = name(params, lr=lr)
    except TypeError as err:
        raise TypeError(f"optimizer: the factory must accept (params, lr=...): {err}") from err
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer: the factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _split_data(data, eval_data):
    """(train (x, y) or None, eval data or None, dataset spec or None)."""
    spec = None
    train_xy = None
    if hasattr(data, "x_train") and hasattr(data, "y_train"):   # an nbbatch DataBundle
        train_xy = (data.x_train, data.y_train)
        if eval_data is None and getattr(data, "x_test", None) is not None and len(data.x_test):
            eval_data = (data.x_test, data.y_test)
        spec = getattr(data, "spec", None)
    elif isinstance(data, DataLoader):
        pass
    elif as_tensors(data) is not None:
        train_xy = as_tensors(data)
    elif isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError("data: an iterable-style Dataset is not supported; pass a map-style Dataset, tensors or a DataLoader")
    else:
        raise TypeError(f"data must be a DataBundle, a pair (x, y) of tensors, a Dataset or a DataLoader, "
                        f"got {type(data).__name__}")
    if train_xy is not None:
        x, y = train_xy
        if len(x) != len(y):
            raise ValueError(f"data: {len(x)} inputs but {len(y)} labels")
    if eval_data is not None:
        xy = as_tensors(eval_data)
        if xy is not None:
            if len(xy[0]) != len(xy[1]):
                raise ValueError(f"eval_data: {len(xy[0])} inputs but {len(xy[1])} labels")
            eval_data = xy
        elif not isinstance(eval_data, (Dataset, DataLoader)):
            raise TypeError(f"eval_data must be a pair (x, y) of tensors, a Dataset or a DataLoader, got {type(eval_data).__name__}")
    return train_xy, eval_data, spec


def _length(data) -> int | None:
    if isinstance(data, DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else None
    return len(data)


def _sampled_population(data, n_train: int | None) -> int | None:
    """N for the online noise scale: the examples each batch is drawn from without replacement.

    Tensors, a DataBundle and a map-style Dataset are shuffled by the Trainer (one permutation per
    epoch, shared by all processes): N is the training set. A DataLoader draws by its sampler: N is
    its dataset's length for torch's shuffling (without replacement) or sequential sampler over the
    whole dataset, batched by torch's BatchSampler, else None (unknown: the 1/B approximation).
    """
    if not isinstance(data, DataLoader):
        return n_train
    if not isinstance(data.batch_sampler, torch.utils.data.BatchSampler):   # a custom batch sampler
        return None
    sampler = getattr(data, "sampler", None)
    whole = n_train is not None and n_train >= 2
    if isinstance(sampler, torch.utils.data.RandomSampler):
        return n_train if whole and not sampler.replacement and sampler.num_samples == n_train else None
    if isinstance(sampler, torch.utils.data.SequentialSampler):
        return n_train if whole else None
    return None


def _first_batch(data):
    if isinstance(data, DataLoader):
        # A shuffling loader draws its order (and its workers' base seed) from the global
        # generator: a look at its first batch must leave that generator where it was.
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(data))
        return batch[0], batch[1]
    items = [data[i] for i in range(min(2, len(data)))]
    xs = torch.stack([torch.as_tensor(it[0]) for it in items])
    ys = torch.stack([torch.as_tensor(it[1]) for it in items])
    return xs, ys


def _check_model(model: nn.Module) -> None:
    """A model the Trainer can move and train: tensors with data, something to train."""
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"model: {empty[:3]} are on the meta device (shapes without data), so the model cannot "
                         f"be trained or moved; materialise it first (model.to_empty(device='cpu') and initialise "
                         f"the parameters, or build it outside torch.device('meta'))")
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"model: none of its {len(params)} parameters is trainable (all have requires_grad=False); "
                         f"unfreeze some (p.requires_grad_(True)) before training")


def _check_batch_schedule(cfg: TrainConfig, data, n_train: int | None) -> None:
    """A batch_schedule the data can follow: not a DataLoader's fixed batches, none larger than the data."""
    batch_schedule = cfg.batch_schedule_value
    if batch_schedule is None:
        return
    if isinstance(data, DataLoader):
        raise ValueError(f"batch_schedule={cfg.batch_schedule!r}: a DataLoader's batches have its own fixed size; "
                         f"pass the tensors, a DataBundle or the Dataset so the trainer can batch them")
    largest = max(batch_schedule.sizes)
    if n_train is not None and largest > n_train:
        raise ValueError(f"batch_schedule={cfg.batch_schedule!r} reaches a batch of {largest}, larger than the "
                         f"training set ({n_train} examples); keep every batch size <= {n_train}")


def _split_sizes(n: int, k: int) -> list[int]:
    # The sizes tensor_split(batch of n, k) gives, as the step splits a batch into micro-batches.
    k = min(k, n)
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def _batch_norm_problems(model: nn.Module, n_train: int | None, cfg: TrainConfig, data) -> tuple[str | None, str | None]:
    """What batch norm cannot normalise: (in every batch, in the short last batch of an epoch), or None."""
    layers = [m for _, m in bn_layers(model)]
    if not layers or n_train is None:
        return None, None
    if isinstance(data, DataLoader):
        batch, drop_last = data.batch_size, data.drop_last
    else:
        batch, drop_last = cfg.batch_size, cfg.drop_last
    if batch is None:
        return None, None
    if cfg.batch_schedule is not None and not isinstance(data, DataLoader):
        # Every scheduled size is checked now, its short last batch included: the sizes change with the
        # epoch, so a problem that only some epochs' last batch has is refused up front.
        for b in cfg.batch_schedule_value.sizes:
            every, last = _batch_norm_problems(model, n_train, cfg.replace(batch_size=b, batch_schedule=None), data)
            if every is not None or last is not None:
                return f"batch_schedule: {every or last}", None
        return None, None
    last = n_train % batch
    splits = [cfg.accumulate] + ([2] if cfg.noise_scale_every is not None and cfg.accumulate == 1 else [])
    ghost = any(hasattr(layer, "virtual_sizes") for layer in layers)

    def problem(b: int) -> str | None:
        what = f"the last batch of each epoch ({b} of {n_train} examples)" if b != batch else f"a batch of {b}"
        fix = ("pass drop_last=True to skip the short last batch" if b != batch
               else "use a larger batch_size or fewer accumulation steps")
        for k in splits:
            for m in sorted(set(_split_sizes(b, k))):
                part = what if m == b else f"{what}, split into micro-batches of {m},"
                if m < 2 and not ghost:
                    return (f"batch_size={batch}: {part} leaves batch norm one example to normalise, which it "
                            f"cannot; {fix}")
                for layer in layers:
                    if hasattr(layer, "virtual_sizes"):   # ghost batch norm: its virtual batches must fit
                        try:
                            layer.virtual_sizes(m)
                        except ValueError as err:
                            return f"batch_size={batch}: ghost batch norm cannot normalise {part}: {err}; {fix}"
        return None

    return problem(batch), (problem(last) if last and not drop_last else None)


@torch.no_grad()
def _check_fit(model: nn.Module, loss_fn, loss_name, x: torch.Tensor, y: torch.Tensor, all_labels=None,
               metrics: Mapping[str, Callable] | None = None) -> None:
    """Run two examples through the model (eval mode, nothing updated), the loss and the metrics."""
    param = next(model.parameters())
    device = param.device
    was_training = model.training
    model.eval()
    try:
        try:
            out = model(x.to(device))
        except Exception as err:
            dtypes = ""
            if x.is_floating_point() and param.is_floating_point() and x.dtype != param.dtype:
                dtypes = (f"the model's parameters are {param.dtype} but the inputs are {x.dtype}: convert one "
                          f"to the other (model.to({x.dtype}) or the inputs to {param.dtype}). ")
            raise ValueError(f"data: {dtypes}the model cannot take inputs of shape {tuple(x.shape[1:])} "
                             f"(per example): {err}") from err
        y = y.to(device)
        if loss_name == "cross_entropy":
            if y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or out.dim() != 2 or y.dim() != 1:
                raise ValueError(f"labels of shape {tuple(y.shape)} and dtype {y.dtype} do not fit the model's output "
                                 f"of shape {tuple(out.shape)} for cross-entropy: expected int64 class indices of shape "
                                 f"({out.shape[0]},) for an output of shape (N, classes)")
            labels = all_labels if all_labels is not None else y
            lo, hi, classes = int(labels.min()), int(labels.max()), out.shape[-1]
            if lo < 0 or hi >= classes:
                raise ValueError(f"labels range over [{lo}, {hi}] but the model has {classes} outputs; "
                                 f"class indices must lie in [0, {classes - 1}]")
        elif loss_name == "mse":
            o = out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out
            if o.shape != y.shape:
                raise ValueError(f"labels of shape {tuple(y.shape)} do not fit the model's output of shape "
                                 f"{tuple(out.shape)} for the mse loss")
        try:
            loss = loss_fn(out, y)
        except Exception as err:
            raise ValueError(f"labels of shape {tuple(y.shape)} do not fit the model's output of shape "
                             f"{tuple(out.shape)}: {err}") from err
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            what = (f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor)
                    else f"a {type(loss).__name__}")
            raise ValueError(f"loss: it returned {what}; the loss must return one floating-point number as a "
                             f"tensor (reduce a per-example loss with .mean())")
        for name, fn in (metrics or {}).items():
            try:
                value = fn(out, y)
            except Exception as err:
                raise ValueError(f"metrics[{name!r}]: it failed on the model's output of shape {tuple(out.shape)} "
                                 f"and labels of shape {tuple(y.shape)}: {err}") from err
            ok = (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()) or (
                isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                what = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                        else f"{type(value).__name__} {value!r}"[:80])
                raise ValueError(f"metrics[{name!r}]: it returned {what}; a metric must return one number "
                                 f"(a float or a one-element tensor)")
    finally:
        model.train(was_training)
