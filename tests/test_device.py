import numpy as np
import pytest
import torch

from nbbatch.device import (autocast_context, describe_device, peak_memory_bytes, process_peak_rss_bytes,
                            resolve_device, resolve_precision, seed_everything)
from helpers import requires_cuda


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    assert resolve_device("auto").type == (expected or ("mps" if torch.backends.mps.is_available() else "cpu"))
    for bad in ("gpu", "cuda:x", "cpu:zero"):
        with pytest.raises(ValueError, match="not a known device"):
            resolve_device(bad)
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requests_fail_clearly_without_cuda():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="not available"):
            resolve_device(name)


def test_precision_policy_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision='half'"):
        resolve_precision("half", cpu)
    with autocast_context("bf16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context("fp32", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_seed_everything_seeds_all_generators():
    seed_everything(3)
    a = (torch.rand(2), np.random.rand(), __import__("random").random())
    seed_everything(3)
    b = (torch.rand(2), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything(1.5)


def test_memory_readings_on_cpu():
    assert peak_memory_bytes(torch.device("cpu")) is None
    assert process_peak_rss_bytes() > 10 * 2**20
    assert describe_device(torch.device("cpu")).startswith("cpu (1 thread,")
    torch.set_num_threads(2)
    assert describe_device(torch.device("cpu")).startswith("cpu (2 threads,")


@requires_cuda
def test_cuda_policy_and_memory():
    dev = resolve_device("cuda")
    assert resolve_precision("auto", dev) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    torch.cuda.reset_peak_memory_stats(dev)
    x = torch.empty(2**20, device=dev)
    assert peak_memory_bytes(dev) >= x.numel() * 4
