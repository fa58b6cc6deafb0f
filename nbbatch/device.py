"""Device choice, precision policy, memory readings and seeding.

Nothing here runs at import: every probe of CUDA/MPS happens inside a function call.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from contextlib import nullcontext

import numpy as np
import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into an available ``torch.device``.

    ``"auto"`` picks CUDA, then Apple's MPS, then the CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.

    Raises:
        ValueError: for an unknown name or a device this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__} {device!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICE_NAMES[1:] or (index and not index.isdigit()):
        raise ValueError(f"device={device!r} is not a known device; use one of {DEVICE_NAMES} (or 'cuda:N')")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} is not available: this machine has no CUDA device; use device='auto' or 'cpu'")
        n = torch.cuda.device_count()
        i = int(index) if index else torch.cuda.current_device()
        if i >= n:
            raise ValueError(f"device={device!r} is not available: this machine has {n} CUDA device(s)")
        return torch.device("cuda", i)
    if kind == "mps" and not _mps_available():
        raise ValueError(f"device={device!r} is not available on this machine; use device='auto' or 'cpu'")
    return torch.device(kind)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Choose the training precision for ``device``: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``"auto"`` gives bf16 on a CUDA device that supports it and fp32 everywhere else
    (on a CPU bf16 autocast is usually slower than fp32, so it is only used when asked for).

    Raises:
        ValueError: an unknown name, or fp16 on a device without fp16 training support (the CPU).

    Example:
        >>> resolve_precision("auto", torch.device("cpu"))
        'fp32'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not known; use one of {PRECISIONS}")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' needs a CUDA or MPS device; on the CPU use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'fp16' or 'fp32'")
    return precision


def autocast_context(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices).

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(a == torch.rand(1))
        True
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on devices that keep one (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset, or None where the device keeps no count."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps" and hasattr(torch, "mps"):
        return int(torch.mps.current_allocated_memory())
    return None


def process_peak_rss_bytes() -> int:
    """The process's peak resident set size (a coarse cross-check on the CPU)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def describe_device(device: torch.device) -> str:
    """A one-line description such as ``"cpu (2 threads)"`` or ``"cuda:0 NVIDIA H100"``."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'}, {os.cpu_count()} cores)"
    return str(device)
