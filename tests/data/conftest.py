"""Shared fixtures for tests/data: tiny synthetic datasets in their real on-disk formats."""

import pytest

from invseg.data import write_synthetic_decathlon


@pytest.fixture
def msd(tmp_path):
    """Factory: write a tiny MSD dataset (24^3 volumes) under tmp_path and return its dataset.json."""

    def make(name="task", num_volumes=3, num_classes=2, num_modalities=1, **kwargs):
        kwargs.setdefault("size", (24, 24, 24))
        return write_synthetic_decathlon(
            tmp_path / name, num_volumes=num_volumes, num_classes=num_classes, num_modalities=num_modalities, **kwargs
        )

    return make
