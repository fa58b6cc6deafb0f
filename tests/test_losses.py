"""The shared losses: names resolve to the references, bad names and types are refused."""
import pytest
import torch
import torch.nn.functional as F

from nbbatch.losses import LOSSES, accuracy, mse_loss, resolve_loss


def test_names_resolve_to_the_torch_references():
    torch.manual_seed(0)
    out, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    assert set(LOSSES) == {"cross_entropy", "mse"}
    assert torch.equal(resolve_loss("cross_entropy")(out, y), F.cross_entropy(out, y))
    col, target = torch.randn(5, 1), torch.randn(5)
    # an (N, 1) output against (N,) targets: the column is compared row by row, not broadcast to (N, N)
    assert torch.equal(resolve_loss("mse")(col, target), F.mse_loss(col[:, 0], target))
    same = torch.randn(5, 2)
    assert torch.equal(mse_loss(same, torch.zeros(5, 2)), (same ** 2).mean())


def test_a_callable_passes_through():
    def loss(o, t):
        return (o - t).abs().mean()
    assert resolve_loss(loss) is loss


@pytest.mark.parametrize("bad, error, words", [("l1", ValueError, "loss='l1' is not known"),
                                               (3, TypeError, "loss must be a name or a callable")])
def test_bad_losses_are_refused(bad, error, words):
    with pytest.raises(error, match=words):
        resolve_loss(bad)


def test_accuracy_counts_rows_whose_argmax_is_the_target():
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(out, torch.tensor([1, 0, 0, 1])).item() == 0.5
