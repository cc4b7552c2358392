import pytest
import torch
from torch.utils.data import TensorDataset

from invseg.data import make_loader

DATA = TensorDataset(torch.arange(10))


def _order(loader):
    return [int(v) for (batch,) in loader for v in batch]


def test_seeded_shuffle_is_deterministic():
    assert _order(make_loader(DATA, 3, shuffle=True, seed=5)) == _order(make_loader(DATA, 3, shuffle=True, seed=5))
    assert sorted(_order(make_loader(DATA, 3, shuffle=True))) == list(range(10))
    assert _order(make_loader(DATA, 3, shuffle=False)) == list(range(10))


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_shards(drop_last):
    loaders = [
        make_loader(DATA, 2, shuffle=True, distributed=True, num_replicas=3, rank=r, drop_last=drop_last)
        for r in range(3)
    ]
    shards = [_order(loader) for loader in loaders]
    if drop_last:  # 10 // 3 = 3 items per rank, one batch of 2 each
        assert all(len(s) == 2 for s in shards)
    else:  # padded to 12: every item appears, 4 per rank
        assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    first = _order(loaders[0])
    loaders[0].sampler.set_epoch(1)
    assert _order(loaders[0]) != first or drop_last


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"num_workers": -1}])
def test_arguments(kwargs):
    with pytest.raises(ValueError):
        make_loader(DATA, **{"batch_size": 2, "shuffle": False, **kwargs})


def test_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        make_loader(TensorDataset(torch.zeros(0)), 2, shuffle=False)
