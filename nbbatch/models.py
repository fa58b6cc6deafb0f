"""The small reference models the notebooks use: an MLP, a 1-D CNN, and the norm choice.

Both models are ``nn.Sequential`` so that activation checkpointing over segments
(``torch.utils.checkpoint.checkpoint_sequential``) and norm conversion can walk
their layers in order. Every hidden block keeps a norm slot (``nn.Identity`` for
``norm="none"``) so that swapping the normalisation never changes layer indices.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .checks import check_int

if TYPE_CHECKING:  # imported for annotations only; models.py never loads data
    from nbbatch.data import DataBundle

__all__ = ["ACTIVATIONS", "CNN1d", "MLP", "MODELS", "NORMS", "make_model", "make_norm"]

NORMS = ("none", "batch", "group", "layer")
MODELS = ("mlp", "cnn")
ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


def _check_sizes(name: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, e.g. (100, 100), got {value!r}")
    for i, size in enumerate(value):
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a sequence of positive ints, got {value!r} (entry {i} is {size!r})")
    return tuple(int(size) for size in value)


def _check_norm(norm: Any) -> str:
    if norm is None:
        norm = "none"
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm.lower()


def default_groups(num_channels: int) -> int:
    # At most 8 groups (a common GroupNorm choice for narrow nets), reduced until it divides C.
    groups = min(8, num_channels)
    while num_channels % groups:
        groups -= 1
    return groups


def make_norm(kind: Optional[str], num_features: int, *, dims: int = 1, groups: Optional[int] = None) -> nn.Module:
    """Build a normalisation layer for ``num_features`` channels.

    ``dims`` is the number of non-batch dimensions of the input: 1 for MLP
    features ``(N, C)``, 2 for 1-D conv maps ``(N, C, L)``, 3 for images ``(N, C, H, W)``.

    ============  ======================  ==========================================
    kind          ``(N, C)`` (dims=1)      ``(N, C, L)`` / ``(N, C, H, W)``
    ============  ======================  ==========================================
    ``"none"``    ``nn.Identity()``        ``nn.Identity()``
    ``"batch"``   ``nn.BatchNorm1d(C)``    ``nn.BatchNorm1d(C)`` / ``nn.BatchNorm2d(C)``
    ``"group"``   ``nn.GroupNorm(g, C)``   ``nn.GroupNorm(g, C)``
    ``"layer"``   ``nn.LayerNorm(C)``      ``nn.GroupNorm(1, C)`` (over C and L, the conv layer norm)
    ============  ======================  ==========================================

    Args:
        kind: One of :data:`NORMS` (``None`` means ``"none"``).
        num_features: Number of channels ``C``.
        dims: Number of non-batch input dimensions (1, 2 or 3), see above.
        groups: Groups for ``"group"``; default ``min(8, C)`` lowered until it divides ``C``.
            Only valid with ``kind="group"``.

    Returns:
        The ``nn.Module``.

    Example:
        >>> make_norm("group", 25, dims=2)
        GroupNorm(5, 25, eps=1e-05, affine=True, bias=True)
        >>> make_norm("layer", 100)
        LayerNorm((100,), eps=1e-05, elementwise_affine=True, bias=True)
    """
    kind = _check_norm(kind)
    num_features = check_int("num_features", num_features)
    if isinstance(dims, bool) or dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1 for (N, C), 2 for (N, C, L) or 3 for (N, C, H, W) inputs, got {dims!r}")
    if groups is not None:
        if kind != "group":
            raise ValueError(f"groups is only used with norm='group', got groups={groups!r} with norm={kind!r}")
        groups = check_int("groups", groups)
        if num_features % groups:
            raise ValueError(f"groups must divide num_features={num_features}, got groups={groups}")
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(num_features) if dims == 3 else nn.BatchNorm1d(num_features)
    if kind == "group":
        return nn.GroupNorm(groups if groups is not None else default_groups(num_features), num_features)
    # "layer": one group normalises each sample over all of (C, L) with a per-channel
    # affine, which is what layer norm means for conv maps; LayerNorm(C) there would
    # normalise over the wrong (last) axis.
    return nn.LayerNorm(num_features) if dims == 1 else nn.GroupNorm(1, num_features)


def _make_activation(activation: Any) -> nn.Module:
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation.lower()]()


class _SequentialModel(nn.Sequential):
    """``nn.Sequential`` whose slices are plain ``nn.Sequential``.

    ``Sequential.__getitem__`` rebuilds slices with ``self.__class__(OrderedDict)``,
    which would call our validating constructors with the wrong arguments;
    ``model[:-1]`` (a feature extractor) must keep working.
    """

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class MLP(_SequentialModel):
    """Multi-layer perceptron: ``Flatten -> [Linear -> norm -> activation (-> Dropout)] * k -> Linear``.

    Inputs of any shape ``(N, ...)`` are flattened first, so ``in_features`` is the
    number of values per sample. The norm slot is ``nn.Identity`` for ``norm="none"``.

    Args:
        in_features: Values per sample (40 for mnist1d, 64 for digits).
        hidden: Widths of the hidden layers; ``()`` gives a linear model.
        num_classes: Output width (classes, or regression targets).
        norm: One of :data:`NORMS`.
        activation: One of :data:`ACTIVATIONS`.
        dropout: Dropout probability after each activation, in [0, 1).

    Example:
        >>> model = MLP(40, (100, 100), 10)
        >>> model(torch.randn(32, 40)).shape
        torch.Size([32, 10])
        >>> sum(p.numel() for p in model.parameters())
        15210
    """

    def __init__(
        self,
        in_features: int = 40,
        hidden: Sequence[int] = (100, 100),
        num_classes: int = 10,
        norm: str = "none",
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        in_features = check_int("in_features", in_features)
        hidden = _check_sizes("hidden", hidden)
        num_classes = check_int("num_classes", num_classes)
        norm = _check_norm(norm)
        _make_activation(activation)  # validate before building anything
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")

        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), make_norm(norm, size, dims=1), _make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.in_features, self.hidden, self.num_classes = in_features, hidden, num_classes
        self.norm, self.activation, self.dropout = norm, activation.lower(), float(dropout)


class _AddChannel(nn.Module):
    """``(N, L) -> (N, 1, L)``; ``(N, 1, L)`` passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x.unsqueeze(1)
        if x.dim() == 3 and x.shape[1] == 1:
            return x
        raise ValueError(f"CNN1d expects input of shape (N, L) or (N, 1, L), got {tuple(x.shape)}")


def _conv_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
    # Output length of nn.Conv1d (dilation 1), from the torch.nn.Conv1d docs.
    return (length + 2 * padding - kernel) // stride + 1


class CNN1d(_SequentialModel):
    """1-D convolutional net for mnist1d, after Greydanus' ``ConvBase``.

    ``Conv1d(1, c1, 5, stride 2, pad 1) -> norm -> ReLU``, then for each further
    channel count ``Conv1d(c_prev, c, 3, stride 2, pad 1) -> norm -> ReLU``, then
    ``Flatten -> Linear(c_last * L_out, num_classes)``. With the defaults the length
    goes 40 -> 19 -> 10 -> 5, so the head is ``Linear(125, 10)``. Accepts inputs
    ``(N, L)`` or ``(N, 1, L)``.

    Args:
        in_length: Input length ``L`` (40 for mnist1d).
        channels: Output channels of each conv layer.
        num_classes: Output width.
        norm: One of :data:`NORMS` (``"layer"`` is ``GroupNorm(1, C)`` here).

    Example:
        >>> model = CNN1d()
        >>> model(torch.randn(32, 40)).shape
        torch.Size([32, 10])
        >>> model[-1]
        Linear(in_features=125, out_features=10, bias=True)
    """

    def __init__(
        self,
        in_length: int = 40,
        channels: Sequence[int] = (25, 25, 25),
        num_classes: int = 10,
        norm: str = "none",
    ) -> None:
        in_length = check_int("in_length", in_length)
        channels = _check_sizes("channels", channels)
        if not channels:
            raise ValueError(f"channels must name at least one conv layer, got {channels!r}")
        num_classes = check_int("num_classes", num_classes)
        norm = _check_norm(norm)

        layers: list[nn.Module] = [_AddChannel()]
        length, in_ch = in_length, 1
        for i, out_ch in enumerate(channels):
            kernel = 5 if i == 0 else 3  # ConvBase: a wider first filter, then 3-taps
            layers += [
                nn.Conv1d(in_ch, out_ch, kernel, stride=2, padding=1),
                make_norm(norm, out_ch, dims=2),
                nn.ReLU(),
            ]
            length = _conv_out_length(length, kernel, stride=2, padding=1)
            if length < 1:
                raise ValueError(
                    f"in_length={in_length} is too short for {len(channels)} stride-2 conv layers "
                    f"(the length reaches {length} at layer {i}); use a longer input or fewer channels"
                )
            in_ch = out_ch
        layers += [nn.Flatten(), nn.Linear(in_ch * length, num_classes)]
        super().__init__(*layers)
        self.in_length, self.channels, self.num_classes, self.norm = in_length, channels, num_classes, norm
        self.out_length = length


def make_model(name: str, data: Optional["DataBundle"] = None, *, norm: str = "none", **kwargs: Any) -> nn.Module:
    """Build a reference model by name, sized from a dataset when one is given.

    With ``data``, ``in_features`` (MLP) or ``in_length`` (CNN) and ``num_classes``
    are taken from it; for regression (``num_classes is None``) the output width is
    the number of targets per sample. Explicit ``kwargs`` win over inferred sizes.

    Args:
        name: ``"mlp"`` or ``"cnn"`` (see :data:`MODELS`).
        data: A :class:`~nbbatch.data.DataBundle` to size the model from, or ``None``.
        norm: One of :data:`NORMS`.
        **kwargs: Passed to :class:`MLP` or :class:`CNN1d` (``hidden``, ``channels``, ...).

    Returns:
        The model (on CPU, default dtype).

    Example:
        >>> from nbbatch.data import digits
        >>> make_model("mlp", digits(), hidden=(64,))[1]
        Linear(in_features=64, out_features=64, bias=True)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name str, one of {MODELS}, got {name!r}")
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODELS)}")
    if data is not None:
        if not all(hasattr(data, attr) for attr in ("x_train", "y_train", "num_classes")):
            raise TypeError(f"data must be a DataBundle or None, got {type(data).__name__}")
        in_shape = tuple(data.x_train.shape[1:])
        if data.num_classes is not None:
            outputs = data.num_classes
        else:  # regression: one output per target column
            outputs = 1 if data.y_train.dim() == 1 else math.prod(data.y_train.shape[1:])
        kwargs.setdefault("num_classes", outputs)
        if key == "mlp":
            kwargs.setdefault("in_features", math.prod(in_shape))
        else:
            if len(in_shape) == 1 or (len(in_shape) == 2 and in_shape[0] == 1):
                kwargs.setdefault("in_length", in_shape[-1])
            elif "in_length" not in kwargs:
                raise ValueError(
                    f"cnn needs 1-D inputs of shape (N, L) or (N, 1, L), but data has per-sample shape {in_shape}"
                )
    if key == "mlp":
        return MLP(norm=norm, **kwargs)
    return CNN1d(norm=norm, **kwargs)
