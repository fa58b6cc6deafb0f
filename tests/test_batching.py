import torch

from nbbatch.batching import TensorBatches, epoch_permutation, num_batches


def test_epoch_permutation_is_a_seeded_function_of_seed_and_epoch():
    a = epoch_permutation(100, 0, 0)
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, epoch_permutation(100, 0, 0))
    assert not torch.equal(a, epoch_permutation(100, 0, 1))
    assert not torch.equal(a, epoch_permutation(100, 1, 0))


def test_num_batches():
    assert num_batches(100, 32, False) == 4 and num_batches(100, 32, True) == 3
    assert num_batches(96, 32, False) == num_batches(96, 32, True) == 3


def test_tensor_batches_cover_each_epoch_once_and_resume_mid_epoch():
    x = torch.arange(10).float()[:, None]
    y = torch.arange(10)
    src = TensorBatches(x, y, torch.device("cpu"), batch_size=4, drop_last=False, seed=5)
    batches = list(src.batches(epoch=2))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(seen, epoch_permutation(10, 5, 2))
    tail = list(src.batches(epoch=2, start=4))   # the position in examples: after the first batch
    assert len(tail) == 2 and all(torch.equal(a[1], b[1]) for a, b in zip(tail, batches[1:]))
    assert torch.equal(batches[0][0][:, 0].long(), batches[0][1])   # inputs and labels stay paired


def test_a_new_seed_gives_the_new_seeds_permutation():
    """Resuming sets the source's seed; a permutation cached under the old seed must not be reused."""
    from nbbatch.batching import TensorBatches, epoch_permutation
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    src = TensorBatches(x, y, torch.device("cpu"), batch_size=4, drop_last=False, seed=1)
    assert torch.equal(src.permutation(0), epoch_permutation(10, 1, 0))
    src.seed = 2
    assert torch.equal(src.permutation(0), epoch_permutation(10, 2, 0))
    assert not torch.equal(epoch_permutation(10, 1, 0), epoch_permutation(10, 2, 0))
