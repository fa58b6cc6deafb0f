"""Small shared helpers for the tests."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset


def make_mlp(seed=0, d_in=8, d_out=3, hidden=16, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class PairDataset(Dataset):
    """A map-style dataset read item by item, to exercise the Dataset path."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
