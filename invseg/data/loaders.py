"""One data-loader factory for every dataset of the package (single process or DDP)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.data import DataLoader, list_data_collate
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["make_loader"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """Build a ``monai.data.DataLoader`` for any map-style dataset of :mod:`invseg.data`.

    MONAI's loader is used for all datasets: its default ``list_data_collate`` flattens the lists of
    patches that ``RandCropByPosNegLabeld(num_samples=n)`` returns (a batch then holds
    ``batch_size * n`` patches) and collates ``(image, label)`` tuples like PyTorch's default; its
    worker init re-seeds MONAI's random transforms per worker. Shuffling and the seeds of the
    workers come from a ``torch.Generator`` seeded with ``seed``, never from the global RNG state.

    Args:
        dataset: the dataset.
        batch_size: items per batch (per process when distributed), >= 1.
        shuffle: reshuffle every epoch.
        num_workers: loader worker processes (default 0: load in the main process).
        distributed: shard with ``DistributedSampler`` (default False). Requires an initialised
            process group unless ``num_replicas`` and ``rank`` are given. Call
            ``loader.sampler.set_epoch(epoch)`` every epoch for a new shuffle; without ``drop_last``
            the sampler pads the last shard by repeating items (metrics over a padded val set count
            those items twice).
        seed: seed of the shuffle order / sampler (default 0).
        drop_last: drop the last incomplete batch (default False).
        collate_fn: overrides ``list_data_collate`` (default None).
        pin_memory: pinned host memory for faster GPU copies (default False).
        num_replicas: world size for the sampler (default None: from the process group).
        rank: rank for the sampler (default None: from the process group).

    Returns:
        The ``DataLoader``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("dataset is empty: nothing to load")
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn or list_data_collate,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
