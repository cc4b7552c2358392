"""MONAI dictionary transforms and datasets for 3D (NIfTI) segmentation.

Pipelines (``image`` = first key, ``label`` = second key)::

    train: LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd (bilinear image, nearest label)
           -> intensity (ScaleIntensityRanged | NormalizeIntensityd) with CropForegroundd
           -> SpatialPadd(patch_size) -> RandCropByPosNegLabeld(num_samples) -> RandFlipd x 3 axes
           -> EnsureTyped
    val:   the same deterministic part, without padding, patch sampling or flips

The foreground crop uses ``image > 0``: it runs *after* ``ScaleIntensityRanged`` (which maps air/
background to ``b_min`` = 0, as in MONAI's CT tutorials) but *before* ``NormalizeIntensityd`` (which
makes half the foreground negative). Everything up to the first random transform is deterministic,
so :func:`make_seg_datasets` can cache it with ``monai.data.CacheDataset``.

With ``num_samples > 1`` one dataset item is a list of ``num_samples`` patches; load it with
:func:`invseg.data.make_loader` (MONAI's ``list_data_collate``), giving batches of
``batch_size * num_samples`` patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

__all__ = ["seg_train_transforms", "seg_val_transforms", "make_seg_datasets"]

_INTENSITY = ("range", "normalize", None)


def _check_keys(keys: Sequence[str], need_label: bool) -> tuple[str, str | None]:
    keys = tuple(keys)
    if not 1 <= len(keys) <= 2 or (need_label and len(keys) != 2):
        want = "(image_key, label_key)" if need_label else "(image_key,) or (image_key, label_key)"
        raise ValueError(f"keys must be {want}, got {keys}")
    return keys[0], (keys[1] if len(keys) == 2 else None)


def _deterministic(
    keys: Sequence[str],
    pixdim: Sequence[float] | None,
    orientation: str | None,
    intensity: str | None,
    a_min: float,
    a_max: float,
    b_min: float,
    b_max: float,
    crop_foreground: bool,
    margin: int,
) -> list:
    image_key, label_key = _check_keys(keys, need_label=False)
    keys = [k for k in (image_key, label_key) if k is not None]
    if intensity not in _INTENSITY:
        raise ValueError(f"intensity must be one of {_INTENSITY}, got {intensity!r}")
    if pixdim is not None:
        pixdim = tuple(float(p) for p in pixdim)
        if len(pixdim) != 3 or min(pixdim) <= 0:
            raise ValueError(f"pixdim must be three positive voxel sizes in mm or None, got {pixdim}")
    if intensity == "range" and not a_max > a_min:
        raise ValueError(f"a_max must be > a_min for intensity='range', got a_min={a_min}, a_max={a_max}")

    ts: list = [
        # 4D MSD images (X, Y, Z, M) -> (M, X, Y, Z); 3D volumes get a channel axis of 1
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
    ]
    if orientation is not None:
        # labels=None: axis labels from the MetaTensor's space (RAS for nibabel); explicit to avoid
        # MONAI's FutureWarning about this default
        ts.append(Orientationd(keys=keys, axcodes=orientation, labels=None))
    if pixdim is not None:
        modes = ["nearest" if k == label_key else "bilinear" for k in keys]
        ts.append(Spacingd(keys=keys, pixdim=pixdim, mode=modes))
    crop = []
    if crop_foreground:
        crop = [CropForegroundd(keys=keys, source_key=image_key, margin=margin, allow_smaller=True)]
    if intensity == "range":
        ts += [ScaleIntensityRanged(keys=image_key, a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True)]
        ts += crop
    elif intensity == "normalize":
        ts += crop
        ts += [NormalizeIntensityd(keys=image_key, nonzero=True, channel_wise=True)]
    else:
        ts += crop
    return ts


def seg_train_transforms(
    keys: Sequence[str] = ("image", "label"),
    pixdim: Sequence[float] | None = None,
    orientation: str | None = "RAS",
    intensity: str | None = "normalize",
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    patch_size: Sequence[int] = (96, 96, 96),
    num_samples: int = 2,
    pos: float = 1.0,
    neg: float = 1.0,
    flip_prob: float = 0.5,
    crop_foreground: bool = True,
    margin: int = 0,
) -> Compose:
    """Training transforms for 3D segmentation: load, resample, scale, sample patches, flip.

    Args:
        keys: ``(image_key, label_key)`` of the datalist entries (default ("image", "label")).
        pixdim: target voxel size in mm for ``Spacingd`` (bilinear image, nearest label); None
            (default) keeps the native grid.
        orientation: axis codes for ``Orientationd`` (default "RAS"); None skips reorientation.
        intensity: "normalize" (default): z-score over non-zero voxels per channel (MRI);
            "range": clip ``[a_min, a_max]`` and map to ``[b_min, b_max]`` (CT); None: unchanged.
        a_min: lower input intensity for "range" (default -175, abdominal CT window).
        a_max: upper input intensity for "range" (default 250).
        b_min: output value of ``a_min`` (default 0).
        b_max: output value of ``a_max`` (default 1).
        patch_size: spatial size of the sampled patches (default (96, 96, 96)); volumes smaller
            than this are zero-padded first.
        num_samples: patches per volume and iteration (default 2).
        pos: weight of patches centred on foreground (default 1).
        neg: weight of patches centred on background (default 1).
        flip_prob: probability of a flip along each of the three axes (default 0.5).
        crop_foreground: crop to the bounding box of ``image > 0`` first (default True).
        margin: margin in voxels around the foreground box (default 0).

    Returns:
        A ``monai.transforms.Compose`` mapping a datalist entry to a list of ``num_samples`` dicts
        with ``image`` (C, *patch_size) float32 and ``label`` (1, *patch_size) tensors.
    """
    image_key, label_key = _check_keys(keys, need_label=True)
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be three positive ints, got {patch_size}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ValueError(f"pos and neg must be >= 0 and not both 0, got pos={pos}, neg={neg}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    both = [image_key, label_key]
    ts = _deterministic(keys, pixdim, orientation, intensity, a_min, a_max, b_min, b_max, crop_foreground, margin)
    ts += [
        SpatialPadd(keys=both, spatial_size=patch_size),
        RandCropByPosNegLabeld(
            keys=both, label_key=label_key, spatial_size=patch_size, pos=pos, neg=neg, num_samples=num_samples
        ),
        *[RandFlipd(keys=both, prob=flip_prob, spatial_axis=axis) for axis in range(3)],
        EnsureTyped(keys=both),
    ]
    return Compose(ts)


def seg_val_transforms(
    keys: Sequence[str] = ("image", "label"),
    pixdim: Sequence[float] | None = None,
    orientation: str | None = "RAS",
    intensity: str | None = "normalize",
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    crop_foreground: bool = True,
    margin: int = 0,
) -> Compose:
    """Validation / inference transforms: the deterministic part of :func:`seg_train_transforms`.

    Whole volumes come out (no patch sampling, no flips), for sliding-window inference. Pass
    ``keys=("image",)`` for unlabeled images. Arguments as in :func:`seg_train_transforms`.

    Returns:
        A ``monai.transforms.Compose`` mapping a datalist entry to a dict with ``image`` (C, X, Y, Z)
        and, if a label key is given, ``label`` (1, X, Y, Z) tensors (MetaTensors with the affine).
    """
    ts = _deterministic(keys, pixdim, orientation, intensity, a_min, a_max, b_min, b_max, crop_foreground, margin)
    ts.append(EnsureTyped(keys=list(keys)))
    return Compose(ts)


def make_seg_datasets(
    datalist_train: Sequence[dict[str, Any]],
    datalist_val: Sequence[dict[str, Any]],
    train_transforms: Compose,
    val_transforms: Compose,
    cache: bool = True,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[Dataset, Dataset]:
    """Wrap datalists and transforms in MONAI datasets.

    With ``cache=True`` the deterministic prefix of each pipeline (load, resample, scale, crop) is
    computed once and kept in memory (``monai.data.CacheDataset``): memory ~ ``cache_rate`` x the
    resampled float32 volumes. Use ``cache=False`` (plain ``monai.data.Dataset``, reloads every
    epoch) or a smaller ``cache_rate`` when the dataset does not fit.

    Args:
        datalist_train: training entries.
        datalist_val: validation entries (may be empty).
        train_transforms: e.g. from :func:`seg_train_transforms`.
        val_transforms: e.g. from :func:`seg_val_transforms`.
        cache: use ``CacheDataset`` (default True).
        cache_rate: fraction of items cached, in [0, 1] (default 1.0).
        num_workers: threads used to fill the cache (default 0: the calling thread only).
        progress: show a progress bar while caching (default False).

    Returns:
        ``(train_dataset, val_dataset)``.
    """
    if len(datalist_train) == 0:
        raise ValueError("datalist_train is empty: at least one training case is needed")
    if not 0.0 <= cache_rate <= 1.0:
        raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")

    def build(data, transform):
        if cache:
            # CacheDataset: num_workers None would mean one thread per CPU; 0 or 1 = the calling thread
            return CacheDataset(
                list(data), transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress
            )
        return Dataset(list(data), transform)

    return build(datalist_train, train_transforms), build(datalist_val, val_transforms)
