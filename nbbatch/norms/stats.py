"""What batch norm sees: batch statistics against running estimates, their noise, the classic mistakes.

:class:`BNStatsRecorder` records them at every training forward, :func:`batch_stats` measures
them on one batch, :func:`batch_stat_noise` against the batch size, and :func:`check_bn` finds
the classic train/eval mistakes (:class:`BNCheck`).
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checks import check_int
from .layers import bn_layers, model_device, restore_layers, running_layers, snapshot_layers

__all__ = ["BNCheck", "BNStatsRecorder", "batch_stat_noise", "batch_stats", "check_bn", "check_inputs"]


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
        layers = running_layers(model)
        self.every = check_int("every", every, 1)
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


@torch.no_grad()
def _capture(model: nn.Module, x: torch.Tensor, mode: str) -> dict:
    """Per BN layer: (input mean, input variance) of one forward of ``x`` in ``mode``; nothing changes."""
    layers = running_layers(model)
    seen: dict = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, inputs, name=name: seen.__setitem__(name, _channel_stats(inputs[0]))) for name, layer in layers]
    saved = snapshot_layers(layers)
    was_training = {m: m.training for m in model.modules()}
    try:
        model.train(mode == "train")
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        restore_layers(layers, saved)          # a train-mode forward moved the running estimates
        for m, flag in was_training.items():
            m.training = flag
    return {name: (layer, *seen[name]) for name, layer in layers if name in seen}


def _check_mode(mode: Any) -> str:
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    return mode


def check_inputs(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError(f"{name} must be a tensor of inputs (N, ...), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"{name} must hold at least 2 examples for batch statistics, got {len(x)}")
    return x


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
    x = check_inputs(x)
    mode = _check_mode(mode)
    device = model_device(model)
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
    x = check_inputs(x)
    sizes = list(batch_sizes) if not isinstance(batch_sizes, numbers.Integral) else [batch_sizes]
    if not sizes:
        raise ValueError("batch_sizes must name at least one batch size")
    for b in sizes:
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or not 2 <= b <= len(x):
            raise ValueError(f"batch_sizes must be ints in [2, {len(x)}] (the pool size), got {b!r}")
    draws = check_int("draws", draws, 1)
    device = model_device(model)
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
        >>> from nbbatch.norms import precise_bn
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
        x = check_inputs(x)
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
        device = model_device(model)
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
