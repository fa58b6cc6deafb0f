import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_rng():
    # Bitwise comparisons assume one deterministic thread configuration per test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy():
    """A small classification problem: 200 examples, 8 features, 3 classes (learnable)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    y = (x @ w).argmax(dim=1)
    return x, y
