"""Batch-norm tooling: ghost batch norm, norm conversion, BN statistics, recalibration.

* :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` normalise a large batch in fixed-size
  *virtual* batches (Hoffer et al. 2017, "Train longer, generalize better"); in eval mode they
  are ordinary batch norm with running statistics.
* :func:`convert_norm` swaps the normalisation layers of a model (batch, ghost, group, layer, none).
* :func:`bn_layers`, :class:`BNStatsRecorder`, :func:`batch_stats`, :func:`batch_stat_noise` and
  :func:`check_bn` measure what batch norm sees: batch statistics against running estimates,
  their noise against the batch size, and the classic train/eval mistakes.
* :func:`precise_bn` recomputes running statistics over training batches after training.
* :func:`warn_accumulation_with_bn` is what the Trainer calls when it accumulates over a model
  with batch norm: each micro-batch is normalised on its own, so accumulation is then *not* one
  larger batch.

Written by hand because torch has no ghost batch norm and no norm conversion other than
``SyncBatchNorm.convert_sync_batchnorm``. ``precise_bn`` does what
``torch.optim.swa_utils.update_bn`` does (reset, then a cumulative average with ``momentum=None``),
but under ``no_grad``, for a bounded number of batches, and restoring the layers' momentum and the
model's mode even when a batch fails.
"""

from __future__ import annotations

import copy
import itertools
import numbers
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .checks import check_int
from .models import NORMS, default_groups

__all__ = [
    "BNStatsRecorder",
    "BatchNormAccumulationWarning",
    "CONVERT_TARGETS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "REMAINDERS",
    "batch_stat_noise",
    "batch_stats",
    "bn_layers",
    "check_bn",
    "convert_norm",
    "norm_layers",
    "precise_bn",
    "warn_accumulation_with_bn",
]

# what convert_norm converts to: the norms a model is built with (models.NORMS) and ghost batch norm
CONVERT_TARGETS = (*NORMS, "ghost")
REMAINDERS = ("merge", "separate", "error")


def _factory(layer: nn.Module) -> dict:
    """``device``/``dtype`` keyword arguments that build a layer like ``layer``."""
    ref = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype} if ref.is_floating_point() else {"device": ref.device}


# ---------------------------------------------------------------------------------- ghost BN
class _GhostMixin:
    """Training forward as k separate BatchNorm calls, one per virtual batch (in order).

    Each call normalises its slice with that slice's mean and biased variance and updates the
    running estimates once, exactly as calling the parent BatchNorm k times would: with the
    default momentum 0.1 a batch of k virtual batches moves the running mean k times.
    """

    virtual_batch_size: int
    remainder: str

    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 remainder: str = "merge", device=None, dtype=None) -> None:
        # checked before the parent builds anything
        virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=2)
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size, self.remainder = virtual_batch_size, remainder

    def virtual_sizes(self, batch_size: int) -> list[int]:
        """The sizes of the virtual batches a training batch of ``batch_size`` is split into.

        ``remainder`` decides what happens when ``virtual_batch_size`` does not divide the batch:
        ``"merge"`` folds the leftover examples into the last virtual batch (every statistic uses
        at least ``virtual_batch_size`` examples), ``"separate"`` normalises them as a smaller
        virtual batch of their own, ``"error"`` raises.
        """
        v = self.virtual_batch_size
        if batch_size < v:
            raise ValueError(f"virtual_batch_size={v} is larger than the batch ({batch_size} examples); "
                             f"use virtual_batch_size <= {batch_size} or a larger batch (drop_last=True "
                             f"avoids a short last batch)")
        k, rest = divmod(batch_size, v)
        if rest == 0:
            return [v] * k
        if self.remainder == "error":
            raise ValueError(f"virtual_batch_size={v} does not divide the batch of {batch_size} examples "
                             f"(remainder='error'); use remainder='merge' or 'separate', or a dividing size")
        if self.remainder == "merge":
            return [v] * (k - 1) + [v + rest]
        if rest < 2:
            raise ValueError(f"virtual_batch_size={v} leaves a virtual batch of 1 example out of {batch_size} "
                             f"(remainder='separate'); batch norm needs at least 2, use remainder='merge'")
        return [v] * k + [rest]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)  # eval: exactly the parent BatchNorm (running statistics)
        self._check_input_dim(x)
        sizes = self.virtual_sizes(x.shape[0])  # raises before any running statistic moves
        if len(sizes) == 1:
            return super().forward(x)
        # x: (N, C, ...) -> slices (v_i, C, ...), each normalised by its own statistics.
        return torch.cat([super(_GhostMixin, self).forward(chunk) for chunk in x.split(sizes)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, remainder={self.remainder!r}"

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, virtual_batch_size: int = 32, remainder: str = "merge"):
        """A ghost layer with ``bn``'s settings, affine parameters and running statistics (copied)."""
        ghost = cls(bn.num_features, virtual_batch_size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, remainder=remainder, **_factory(bn))
        ghost.load_state_dict(bn.state_dict())
        ghost.train(bn.training)
        return ghost


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """Batch norm over virtual batches of ``virtual_batch_size`` examples, for ``(N, C)`` or ``(N, C, L)``.

    In training mode a batch of ``k * v`` examples gives exactly the outputs, gradients and
    running statistics of ``k`` separate ``nn.BatchNorm1d`` calls on consecutive slices of ``v``
    (Hoffer et al. 2017). In eval mode it *is* ``nn.BatchNorm1d``: the running estimates normalise.
    It is an ``nn.BatchNorm1d`` subclass with the same parameters and buffers, so state dicts move
    between the two and every batch-norm tool (``precise_bn``, ``batch_stats``) applies.

    Args:
        num_features: Channels ``C``.
        virtual_batch_size: Examples per statistic, at least 2 (Goyal et al. 2017 keep 32).
        eps, momentum, affine, track_running_stats: As for ``nn.BatchNorm1d``.
        remainder: ``"merge"``, ``"separate"`` or ``"error"``: what to do when
            ``virtual_batch_size`` does not divide the batch (see :meth:`virtual_sizes`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> gbn, bn = GhostBatchNorm1d(3, virtual_batch_size=4), nn.BatchNorm1d(3)
        >>> x = torch.randn(8, 3)
        >>> torch.allclose(gbn(x), torch.cat([bn(x[:4]), bn(x[4:])]))
        True
        >>> gbn.virtual_sizes(10), gbn.eval()(x).shape
        ([4, 6], torch.Size([8, 3]))
    """


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """Batch norm over virtual batches of ``virtual_batch_size`` examples, for images ``(N, C, H, W)``.

    The 2-D counterpart of :class:`GhostBatchNorm1d` (see there); an ``nn.BatchNorm2d`` subclass.

    Example:
        >>> gbn = GhostBatchNorm2d(4, virtual_batch_size=2)
        >>> gbn(torch.randn(6, 4, 5, 5)).shape, gbn.num_batches_tracked.item()
        (torch.Size([6, 4, 5, 5]), 3)
    """


_GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}


# ---------------------------------------------------------------------------------- finding norms
def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(name, layer)`` for every batch-norm layer of ``model`` (ghost BN included), in order.

    Example:
        >>> from nbbatch.models import MLP
        >>> [name for name, _ in bn_layers(MLP(8, (4, 4), 2, norm="batch"))]
        ['2', '5']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every normalisation layer (batch, ghost, group, layer norm) of ``model``.

    A layer inside another norm layer is not listed twice. ``nn.Identity`` slots (``norm="none"``)
    are not norm layers.

    Example:
        >>> from nbbatch.models import CNN1d
        >>> [type(m).__name__ for _, m in norm_layers(CNN1d(norm="group"))]
        ['GroupNorm', 'GroupNorm', 'GroupNorm']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if _is_norm(m)]


# ---------------------------------------------------------------------------------- conversion
def _channels(layer: nn.Module, name: str) -> int:
    if isinstance(layer, _BatchNorm):
        return layer.num_features
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    shape = tuple(layer.normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"cannot convert {name or 'model'}: LayerNorm over shape {shape} has no single channel "
                         f"axis; only LayerNorm(C) over (N, C) features converts")
    return shape[0]


def _affine(layer: nn.Module) -> bool:
    if isinstance(layer, nn.LayerNorm):
        return layer.elementwise_affine and layer.weight is not None
    return bool(layer.affine)


def _image_input(parent: Optional[nn.Module], child_name: str, layer: nn.Module) -> bool:
    """Whether ``layer`` sees (N, C, H, W) maps: a BatchNorm2d, or a norm right after a Conv2d."""
    if isinstance(layer, nn.BatchNorm2d):
        return True
    if isinstance(layer, _BatchNorm):
        return False
    if parent is None:
        return False
    previous = None
    for name, child in parent.named_children():
        if name == child_name:
            break
        previous = child
    return isinstance(previous, nn.Conv2d)


def _fresh_affine(layer: nn.Module) -> nn.Module:
    """``layer`` with gamma 1 and beta 0 (what a new layer starts with), statistics untouched."""
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.fill_(1.0)
        if getattr(layer, "bias", None) is not None:
            layer.bias.fill_(0.0)
    return layer


def _build(to: str, layer: nn.Module, name: str, image: bool, *, virtual_batch_size: int, groups: Optional[int],
           remainder: str, keep_affine: bool, model_factory: Optional[dict] = None) -> nn.Module:
    if to == "none":
        return nn.Identity()
    channels = _channels(layer, name)
    affine = _affine(layer)
    # A layer without parameters or buffers (affine-less group or layer norm) says nothing of the
    # model's device and dtype: take the model's, or a new BatchNorm's statistics would not match.
    factory = _factory(layer) or (model_factory or {})
    eps = layer.eps
    if to in ("batch", "ghost"):
        if isinstance(layer, _BatchNorm):
            base = nn.BatchNorm2d if isinstance(layer, nn.BatchNorm2d) else nn.BatchNorm1d
            if isinstance(layer, nn.BatchNorm3d):
                if to == "ghost":
                    raise ValueError(f"cannot convert {name or 'model'} to 'ghost': BatchNorm3d has no ghost version")
                base = nn.BatchNorm3d
            kwargs = dict(eps=eps, momentum=layer.momentum, affine=layer.affine,
                          track_running_stats=layer.track_running_stats)
        else:
            base = nn.BatchNorm2d if image else nn.BatchNorm1d
            kwargs = dict(eps=eps, affine=affine)
        if to == "ghost":
            new = _GHOST[base](channels, virtual_batch_size, remainder=remainder, **kwargs, **factory)
        else:
            new = base(channels, **kwargs, **factory)
        if isinstance(layer, _BatchNorm):
            # Same statistic, same meaning: running estimates and counters carry over too.
            new.load_state_dict(layer.state_dict())
            return new if keep_affine else _fresh_affine(new)
    elif to == "group":
        g = groups
        if g is None:
            g = default_groups(channels)  # the same default as make_norm
        if channels % g:
            raise ValueError(f"groups={g} does not divide the {channels} channels of {name or 'model'}; "
                             f"choose groups dividing {channels}")
        new = nn.GroupNorm(g, channels, eps=eps, affine=affine, **factory)
    else:  # "layer"
        if isinstance(layer, nn.LayerNorm):
            new = copy.deepcopy(layer)
            return new if keep_affine else _fresh_affine(new)
        # GroupNorm(1, C) is layer norm for (N, C) features (identical to LayerNorm(C)) and for
        # (N, C, L) or (N, C, H, W) maps (over all of C and the positions, per-channel affine).
        new = nn.GroupNorm(1, channels, eps=eps, affine=affine, **factory)
    if keep_affine and affine and getattr(new, "weight", None) is not None:
        # gamma and beta are a per-channel scale and shift of a normalised value in every one of
        # these layers, so they carry over; statistics (how values are normalised) do not.
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None and new.bias is not None:
                new.bias.copy_(layer.bias)
    return new


def convert_norm(model: nn.Module, to: str, *, virtual_batch_size: int = 32, groups: Optional[int] = None,
                 remainder: str = "merge", keep_affine: bool = True, inplace: bool = True) -> nn.Module:
    """Swap every normalisation layer of ``model`` for another kind.

    ===========  =======================================================================
    ``to``       each BatchNorm / GhostBatchNorm / GroupNorm / LayerNorm(C) becomes
    ===========  =======================================================================
    ``"batch"``  ``nn.BatchNorm1d`` (``nn.BatchNorm2d`` for 2-d BN or after a ``Conv2d``)
    ``"ghost"``  :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` (``virtual_batch_size``)
    ``"group"``  ``nn.GroupNorm(groups, C)`` (default groups as in ``models.make_norm``)
    ``"layer"``  ``nn.GroupNorm(1, C)``: layer norm over ``(N, C)`` or ``(N, C, ...)`` inputs
    ``"none"``   ``nn.Identity()``
    ===========  =======================================================================

    The per-channel affine parameters (gamma, beta) carry over whenever both layers have them:
    they are a scale and shift of a normalised value in all these layers. Running statistics
    carry over only between batch and ghost batch norm, which estimate the same thing; a new
    BatchNorm from group or layer norm starts with fresh statistics. Everything is checked and
    built before the model is touched. The new layers hold new parameter tensors: convert before
    building an optimizer (or a Trainer) over the model.

    Args:
        model: The model (or a single norm layer).
        to: One of :data:`CONVERT_TARGETS` (``models.NORMS`` and ``"ghost"``).
        virtual_batch_size: Examples per statistic for ``to="ghost"``.
        groups: Groups for ``to="group"``; must divide every converted layer's channels.
        remainder: Ghost BN's rule for a virtual batch that does not divide the batch.
        keep_affine: Copy gamma and beta into the new layers (False: fresh ones, 1 and 0).
        inplace: Replace the layers inside ``model`` (True) or return a converted deep copy,
            leaving ``model`` unchanged (False).

    Returns:
        The converted model: ``model`` itself when ``inplace`` (unless ``model`` is itself a norm
        layer, which is returned converted), else the copy.

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (6,), 2, norm="batch")
        >>> convert_norm(model, "group", groups=3, inplace=False)[2]
        GroupNorm(3, 6, eps=1e-05, affine=True, bias=True)
        >>> convert_norm(model, "ghost", virtual_batch_size=16)[2]
        GhostBatchNorm1d(6, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, virtual_batch_size=16, remainder='merge')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(to, str) or to.lower() not in CONVERT_TARGETS:
        raise ValueError(f"to must be one of {CONVERT_TARGETS}, got {to!r}")
    to = to.lower()
    virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=2)
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if groups is not None:
        if to != "group":
            raise ValueError(f"groups is only used with to='group', got groups={groups!r} with to={to!r}")
        groups = check_int("groups", groups)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if not isinstance(keep_affine, bool):
        raise TypeError(f"keep_affine must be True or False, got {keep_affine!r}")
    if not norm_layers(model):
        raise ValueError(f"model has no normalisation layers to convert (BatchNorm, GroupNorm or LayerNorm); "
                         f"{type(model).__name__} with nn.Identity norm slots is built with norm='none': "
                         f"build it with the norm you want instead (e.g. models.MLP(norm='batch'))")
    target = model if inplace else copy.deepcopy(model)
    if _is_norm(target):
        new = _build(to, target, "", _image_input(None, "", target), virtual_batch_size=virtual_batch_size,
                     groups=groups, remainder=remainder, keep_affine=keep_affine)
        return new.train(target.training)
    # Build every replacement first (any error leaves the model untouched), then swap.
    swaps = []
    # Every slot, a layer registered in several places included (remove_duplicate=False): each
    # slot gets the one replacement of its layer, so shared layers stay shared.
    modules = dict(target.named_modules(remove_duplicate=False))
    built: dict[int, nn.Module] = {}
    model_factory = _factory(target)
    for name, layer in modules.items():
        if not _is_norm(layer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if any(name.startswith(done + ".") for done, *_ in swaps):
            continue  # inside a norm layer that is being replaced
        if id(layer) not in built:
            new = _build(to, layer, name, _image_input(parent, child, layer), virtual_batch_size=virtual_batch_size,
                         groups=groups, remainder=remainder, keep_affine=keep_affine, model_factory=model_factory)
            built[id(layer)] = new.train(layer.training)
        swaps.append((name, parent, child, built[id(layer)]))
    for _, parent, child, new in swaps:
        setattr(parent, child, new)
    return target


# ---------------------------------------------------------------------------------- statistics
def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of a BN input ``(N, C, ...)`` (what BN estimates)."""
    x = x.detach().float()
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=True)


def _compare(name: str, layer: _BatchNorm, mean: torch.Tensor, var: torch.Tensor, n: int) -> dict:
    """How far the statistics of one input are from the layer's running estimates."""
    run_mean, run_var = layer.running_mean.float(), layer.running_var.float()
    scale = (run_var + layer.eps).sqrt()
    shift = (mean - run_mean).abs() / scale                 # |mu_B - mu_run| in running std units, (C,)
    ratio = (var + layer.eps) / (run_var + layer.eps)       # var_B / var_run, (C,)
    return {"layer": name, "batch_size": n, "mean_shift": shift.mean().item(), "max_mean_shift": shift.max().item(),
            "var_ratio": ratio.mean().item(), "max_log_var_ratio": ratio.log().abs().max().item()}


def _running_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model has no batch-norm layers (nn.BatchNorm1d/2d/3d or GhostBatchNorm)")
    return layers


class BNStatsRecorder:
    """Record, at every training forward, each BN layer's batch statistics against its running ones.

    Forward pre-hooks read the layer's input before the layer updates its running estimates, and
    store per layer: ``mean_shift`` (channel average of ``|mu_B - mu_run| / sqrt(var_run + eps)``),
    ``max_mean_shift``, ``var_ratio`` (channel average of ``var_B / var_run``, unbiased batch
    variance) and ``max_log_var_ratio``. ``call`` counts the layer's training forwards (one per
    optimizer step without accumulation). Eval-mode forwards are not recorded. For ghost BN the
    statistics are those of the layer's whole input, not of each virtual batch.

    Args:
        model: A model with batch-norm layers.
        every: Record every ``every``-th training forward of each layer.

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (4,), 2, norm="batch")
        >>> with BNStatsRecorder(model) as rec:
        ...     _ = model(torch.randn(16, 8))
        >>> [(r["layer"], r["call"], r["batch_size"]) for r in rec.rows]
        [('2', 0, 16)]
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        layers = _running_layers(model)
        self.every = check_int("every", every)
        self.rows: list[dict] = []
        self._calls = {name: 0 for name, _ in layers}
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers
                         if layer.track_running_stats]

    def _hook(self, name: str):
        def hook(layer: _BatchNorm, inputs):
            if not layer.training:
                return
            call = self._calls[name]
            self._calls[name] = call + 1
            if call % self.every:
                return
            x = inputs[0]
            mean, var = _channel_stats(x)
            self.rows.append({"call": call, **_compare(name, layer, mean, var, x.shape[0])})
        return hook

    def remove(self) -> None:
        """Detach the hooks (the rows stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BNStatsRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def to_pandas(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def _snapshot(layers) -> list[dict]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for _, layer in layers]


def _restore(layers, saved) -> None:
    with torch.no_grad():
        for (_, layer), state in zip(layers, saved):
            for key, value in state.items():
                getattr(layer, key).copy_(value)


@torch.no_grad()
def _capture(model: nn.Module, x: torch.Tensor, mode: str) -> dict:
    """Per BN layer: (input mean, input variance) of one forward of ``x`` in ``mode``; nothing changes."""
    layers = _running_layers(model)
    seen: dict = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, inputs, name=name: seen.__setitem__(name, _channel_stats(inputs[0]))) for name, layer in layers]
    saved = _snapshot(layers)
    was_training = {m: m.training for m in model.modules()}
    try:
        model.train(mode == "train")
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        _restore(layers, saved)          # a train-mode forward moved the running estimates
        for m, flag in was_training.items():
            m.training = flag
    return {name: (layer, *seen[name]) for name, layer in layers if name in seen}


def _check_mode(mode: Any) -> str:
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    return mode


def _check_inputs(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError(f"{name} must be a tensor of inputs (N, ...), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"{name} must hold at least 2 examples for batch statistics, got {len(x)}")
    return x


def _model_device(model: nn.Module) -> Optional[torch.device]:
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    return ref.device if ref is not None else None


def batch_stats(model: nn.Module, x: torch.Tensor, *, mode: str = "train") -> list[dict]:
    """Each BN layer's input statistics on the batch ``x`` against its running estimates.

    One forward pass of ``x`` in ``mode`` under ``no_grad``; the model's modes and running
    statistics are restored afterwards. ``mode="train"`` gives what the layers normalise with
    during training; ``mode="eval"`` gives what the layers receive at evaluation (upstream layers
    using running statistics), so a large gap there means the running estimates are stale.

    Args:
        model: A model with batch-norm layers.
        x: A batch of inputs ``(N, ...)``, N >= 2.
        mode: ``"train"`` or ``"eval"``.

    Returns:
        One dict per BN layer: ``layer``, ``batch_size``, ``mean_shift``, ``max_mean_shift``,
        ``var_ratio``, ``max_log_var_ratio`` (see :class:`BNStatsRecorder`).

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (4,), 2, norm="batch")            # fresh: running mean 0, variance 1
        >>> row, = batch_stats(model, torch.randn(4000, 8) * 0 + 3.0)
        >>> row["var_ratio"] < 1e-3, model[2].running_mean.abs().max().item()
        (True, 0.0)
    """
    x = _check_inputs(x)
    mode = _check_mode(mode)
    device = _model_device(model)
    stats = _capture(model, x.to(device) if device is not None else x, mode)
    return [_compare(name, layer, mean, var, len(x)) for name, (layer, mean, var) in stats.items()]


def batch_stat_noise(model: nn.Module, x: torch.Tensor, batch_sizes: Iterable[int], *, draws: int = 50,
                     seed: int = 0) -> list[dict]:
    """How noisy each BN layer's batch statistics are, against the batch size.

    For each ``B``, ``draws`` batches of ``B`` examples are drawn from ``x`` without replacement
    and passed through the model in train mode (nothing is updated). Against the statistics of
    all of ``x`` (mean ``mu``, population variance ``s2``) each row gives

    * ``mean_noise`` = channel average of ``E[(mu_B - mu)^2] / s2``,
    * ``var_noise`` = channel average of ``E[(var_B / s2 - 1)^2]``, with ``var_B`` the biased batch
      variance that BN normalises with.

    For a layer whose input does not depend on the batch (the first BN layer) ``mean_noise`` is
    ``(1/B) (N - B) / (N - 1)``: the variance of a mean of ``B`` draws without replacement.

    Args:
        model: A model with batch-norm layers.
        x: The pool of inputs ``(N, ...)``.
        batch_sizes: Sizes ``B`` with ``2 <= B <= N``.
        draws: Batches per size.
        seed: Seeds the draws.

    Returns:
        One dict per (layer, B): ``layer``, ``batch_size``, ``mean_noise``, ``var_noise``, ``predicted_mean_noise``.

    Example:
        >>> from nbbatch.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> rows = batch_stat_noise(MLP(8, (16,), 2, norm="batch"), torch.randn(500, 8), [4, 64], draws=200)
        >>> [(r["batch_size"], abs(r["mean_noise"] / r["predicted_mean_noise"] - 1) < 0.15) for r in rows]
        [(4, True), (64, True)]
    """
    x = _check_inputs(x)
    sizes = list(batch_sizes) if not isinstance(batch_sizes, numbers.Integral) else [batch_sizes]
    if not sizes:
        raise ValueError("batch_sizes must name at least one batch size")
    for b in sizes:
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or not 2 <= b <= len(x):
            raise ValueError(f"batch_sizes must be ints in [2, {len(x)}] (the pool size), got {b!r}")
    draws = check_int("draws", draws)
    device = _model_device(model)
    x = x.to(device) if device is not None else x
    n = len(x)
    full = {name: (mean, var * (n - 1) / n) for name, (_, mean, var) in _capture(model, x, "train").items()}
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for b in sizes:
        acc = {name: [0.0, 0.0] for name in full}
        for _ in range(draws):
            idx = torch.randperm(n, generator=gen)[:b].to(x.device)
            for name, (_, mean, var) in _capture(model, x[idx], "train").items():
                mu, s2 = full[name]
                var = var * (b - 1) / b          # the biased variance BN normalises with
                acc[name][0] += ((mean - mu) ** 2 / s2.clamp_min(1e-12)).mean().item()
                acc[name][1] += ((var / s2.clamp_min(1e-12) - 1) ** 2).mean().item()
        for name, (m, v) in acc.items():
            rows.append({"layer": name, "batch_size": int(b), "mean_noise": m / draws, "var_noise": v / draws,
                         "predicted_mean_noise": (n - b) / (b * (n - 1))})
    return rows


# ---------------------------------------------------------------------------------- checks
class BNCheck:
    """What :func:`check_bn` found: ``problems`` (sentences), per-layer ``layers`` rows, ``ok``."""

    def __init__(self, problems: list[str], layers: list[dict]) -> None:
        self.problems = problems
        self.layers = layers

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"batch norm looks right ({len(self.layers)} layers checked)"
        return "\n".join(f"- {p}" for p in self.problems)

    def __repr__(self) -> str:
        return f"BNCheck(ok={self.ok}, problems={len(self.problems)})"


def check_bn(model: nn.Module, x: Optional[torch.Tensor] = None, *, max_mean_shift: float = 0.15,
             max_var_ratio: float = 1.5) -> BNCheck:
    """Find the classic batch-norm mistakes before evaluating ``model``.

    Call it where you would evaluate. It reports

    * BN layers in training mode (a model evaluated in train mode normalises each evaluation
      batch with its own statistics, so predictions depend on the batch, and the running
      estimates are overwritten with evaluation data);
    * running statistics never updated (``num_batches_tracked == 0``: the layer has never seen a
      training batch, or its statistics were reset);
    * with ``x`` (a sample of *training* inputs, a few hundred examples): stale running statistics,
      where the inputs the layers receive in eval mode are off the running estimates by more than
      ``max_mean_shift`` running standard deviations (channel average) or by a variance ratio
      beyond ``max_var_ratio`` (either way). :func:`precise_bn` repairs those;
    * layers without running statistics (``track_running_stats=False``), which use batch
      statistics in eval mode too.

    Args:
        model: The model about to be evaluated.
        x: Optional training inputs ``(N, ...)`` to test the running statistics against.
        max_mean_shift: Tolerated channel-averaged mean shift, in running standard deviations.
        max_var_ratio: Tolerated ratio of input variance to running variance (and its inverse).

    Returns:
        A :class:`BNCheck`; ``str()`` of it lists the problems, ``.ok`` is True when none.

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (4,), 2, norm="batch")
        >>> print(check_bn(model))                            # doctest: +NORMALIZE_WHITESPACE
        - layer '2' is in training mode: evaluating now normalises each evaluation batch with its own
          statistics (and overwrites the running estimates); call model.eval() first
        - layer '2' has never updated its running statistics (num_batches_tracked == 0): it has not
          seen a training batch, or they were reset
        >>> x = torch.randn(500, 8)
        >>> _ = model(x[:64]); check_bn(model.eval(), x).ok     # one update of momentum 0.1: stale
        False
        >>> check_bn(precise_bn(model, x, batch_size=64), x).ok
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value, low in (("max_mean_shift", max_mean_shift, 0.0), ("max_var_ratio", max_var_ratio, 1.0)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > low:
            raise ValueError(f"{name} must be a number > {low:g}, got {value!r}")
    if x is not None:
        x = _check_inputs(x)
    layers = bn_layers(model)
    problems: list[str] = []
    if not layers:
        return BNCheck([], [])
    for name, layer in layers:
        if layer.training:
            problems.append(f"layer {name!r} is in training mode: evaluating now normalises each evaluation batch "
                            f"with its own statistics (and overwrites the running estimates); call model.eval() first")
    for name, layer in layers:
        if not layer.track_running_stats:
            problems.append(f"layer {name!r} keeps no running statistics (track_running_stats=False): in eval mode "
                            f"it normalises with each batch's statistics, so predictions depend on the batch")
        elif int(layer.num_batches_tracked) == 0:
            problems.append(f"layer {name!r} has never updated its running statistics (num_batches_tracked == 0): "
                            f"it has not seen a training batch, or they were reset")
    rows: list[dict] = []
    if x is not None and any(layer.track_running_stats for _, layer in layers):
        device = _model_device(model)
        stats = _capture(model, x.to(device) if device is not None else x, "eval")
        rows = [_compare(name, layer, mean, var, len(x)) for name, (layer, mean, var) in stats.items()
                if layer.track_running_stats]
        for row in rows:
            stale_mean = row["mean_shift"] > max_mean_shift
            stale_var = not 1.0 / max_var_ratio <= row["var_ratio"] <= max_var_ratio
            if stale_mean or stale_var:
                problems.append(
                    f"layer {row['layer']!r} has stale running statistics: on these inputs (eval mode) its input mean "
                    f"is off by {row['mean_shift']:.2f} running std (channel average) and its variance is "
                    f"{row['var_ratio']:.2f}x the running variance; recompute them with precise_bn(model, data)")
    return BNCheck(problems, rows)


# ---------------------------------------------------------------------------------- precise BN
def _batches_from(data: Any, batch_size: Optional[int], num_batches: int, seed: int):
    """An iterator over at most ``num_batches`` input batches (checked before anything runs)."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):   # an nbbatch DataBundle
        data = data.x_train
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = data[0]
    if isinstance(data, torch.Tensor):
        x = _check_inputs(data, "data")
        if batch_size is None:
            raise ValueError("batch_size is needed when data is a tensor (or a pair of tensors): the size of "
                             "the training batches whose statistics to average, e.g. batch_size=64")
        batch_size = check_int("batch_size", batch_size, minimum=2)
        if batch_size > len(x):
            raise ValueError(f"batch_size={batch_size} is larger than data ({len(x)} examples)")

        def gen():
            g = torch.Generator().manual_seed(int(seed))
            given = 0
            while True:   # passes over the data in a seeded order, short tails dropped
                perm = torch.randperm(len(x), generator=g).to(x.device)
                for i in range(0, len(x) - batch_size + 1, batch_size):
                    yield x[perm[i:i + batch_size]]
                    given += 1
                    if given == num_batches:
                        return
        return gen()
    if batch_size is not None:
        raise ValueError("batch_size is only used when data is a tensor; an iterable gives its own batches")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be input tensors, a pair (x, y), a DataBundle or an iterable of batches "
                        f"(a DataLoader), got {type(data).__name__}")
    return itertools.islice(iter(data), num_batches)


def precise_bn(model: nn.Module, data: Any, *, num_batches: int = 100, batch_size: Optional[int] = None,
               seed: int = 0) -> nn.Module:
    """Recompute the running statistics of every BN layer over training batches ("precise BN").

    The running estimates an exponential moving average leaves behind mix statistics of older
    weights; after training (or after changing weights: averaging, pruning, loading) they can be
    stale. This resets them and feeds ``num_batches`` batches through the model in train mode
    under ``no_grad`` with ``momentum=None``, so each layer's running mean becomes the plain
    average of the batch means and its running variance the average of the (unbiased) batch
    variances, as ``torch.optim.swa_utils.update_bn`` does. The layers' momentum, every module's
    mode, and (on any error) the old statistics are restored. Weights are not touched.

    Args:
        model: A model with batch-norm layers.
        data: Training inputs: a tensor ``(N, ...)``, a tuple ``(x, y)``, a ``DataBundle`` (its
            training split), or an iterable of batches (a DataLoader; tuples use their first item).
        num_batches: How many batches to average over.
        batch_size: Size of the batches drawn from tensor data (needed there; use the training
            batch size, or the virtual batch size of ghost BN).
        seed: Seeds the order in which tensor data is drawn.

    Returns:
        ``model``.

    Example:
        >>> from nbbatch.models import MLP
        >>> model = MLP(8, (4,), 2, norm="batch")
        >>> x = torch.randn(256, 8)
        >>> _ = precise_bn(model, x, batch_size=256, num_batches=1)    # one batch: its exact statistics
        >>> h = model[1](x).detach()
        >>> torch.allclose(model[2].running_mean, h.mean(0)), torch.allclose(model[2].running_var, h.var(0))
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, layer) for name, layer in _running_layers(model) if layer.track_running_stats]
    if not layers:
        raise ValueError("model's batch-norm layers keep no running statistics (track_running_stats=False)")
    num_batches = check_int("num_batches", num_batches)
    batches = _batches_from(data, batch_size, num_batches, seed)
    device = _model_device(model)
    saved = _snapshot(layers)
    momenta = [layer.momentum for _, layer in layers]
    modes = {m: m.training for m in model.modules()}
    used = 0
    try:
        with torch.no_grad():
            for _, layer in layers:
                layer.reset_running_stats()
                layer.momentum = None        # cumulative average over the batches seen
            model.train()
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                model(batch.to(device) if device is not None else batch)
                used += 1
        if used == 0:
            raise ValueError("data gave no batches to recompute the statistics from")
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        for (_, layer), momentum in zip(layers, momenta):
            layer.momentum = momentum
        for m, flag in modes.items():
            m.training = flag
    return model


# ---------------------------------------------------------------------------------- accumulation
class BatchNormAccumulationWarning(UserWarning):
    """Gradient accumulation over a model with batch norm is not one larger batch."""


def _micro_sizes(batch_size: int, accumulate: int) -> list[int]:
    # The sizes torch.tensor_split(batch, accumulate) gives, as the Trainer splits a batch.
    k = min(accumulate, batch_size)
    q, r = divmod(batch_size, k)
    return [q + 1] * r + [q] * (k - r)


def warn_accumulation_with_bn(model: nn.Module, batch_size: int, accumulate: int, *, stacklevel: int = 2,
                              cause: str | None = None) -> bool:
    """Warn (:class:`BatchNormAccumulationWarning`) when accumulating over a model with batch norm.

    With ``accumulate = k`` each micro-batch is normalised with its own statistics and moves the
    running estimates once, so the summed gradient is *not* that of one batch of ``batch_size``:
    it is ghost batch norm with virtual batches of the micro-batch size. No warning when there is
    no accumulation or no BN, nor when every BN layer is a ghost layer whose virtual batch
    divides every micro-batch: then accumulation gives exactly the one-batch update.

    Args:
        model: The model being trained.
        batch_size: Examples per optimizer step.
        accumulate: Micro-batches per optimizer step.
        stacklevel: Passed to ``warnings.warn``.
        cause: what splits the batch, when it is not ``accumulate=...`` itself (the message starts with it).

    Returns:
        Whether it warned.

    Example:
        >>> from nbbatch.models import MLP
        >>> warn_accumulation_with_bn(MLP(norm="batch"), 64, 1), warn_accumulation_with_bn(MLP(), 64, 4)
        (False, False)
        >>> model = convert_norm(MLP(norm="batch"), "ghost", virtual_batch_size=16)
        >>> warn_accumulation_with_bn(model, 64, 4)     # micro-batches of 16 = the virtual batch: exact
        False
    """
    if accumulate <= 1:
        return False
    layers = bn_layers(model)
    if not layers:
        return False
    sizes = _micro_sizes(batch_size, accumulate)
    if all(isinstance(layer, _GhostMixin) and all(m % layer.virtual_batch_size == 0 for m in sizes)
           for _, layer in layers):
        return False
    shown = sorted(set(sizes))
    micro = str(shown[0]) if len(shown) == 1 else " or ".join(map(str, shown))
    warnings.warn(
        f"{cause or f'accumulate={accumulate}'} over a model with batch norm ({len(layers)} BN layer(s)): each micro-batch of "
        f"{micro} examples is normalised with its own statistics and moves the running estimates "
        f"{len(sizes)} times per step, so this is not one batch of {batch_size} but ghost batch norm with "
        f"virtual batches of {micro}. Choices: keep those semantics on purpose with "
        f"nbbatch.norms.convert_norm(model, 'ghost', virtual_batch_size=v), v dividing {micro} (accumulation is "
        f"then exact, and this warning goes); normalise without the batch with convert_norm(model, 'group') "
        f"or 'layer'; or use accumulate=1.",
        BatchNormAccumulationWarning, stacklevel=stacklevel + 1)
    return True
