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

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
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

from invseg.data.decathlon import UnreadableImageError, read_voxels

__all__ = [
    "seg_train_transforms",
    "seg_val_transforms",
    "make_seg_datasets",
    "LoadImageChecked",
    "find_unreadable",
    "resampled_shape",
    "intensity_warnings",
]

_INTENSITY = ("range", "normalize", None)


class LoadImageChecked(LoadImaged):
    """``LoadImaged`` that names the file it cannot read (:class:`UnreadableImageError`).

    MONAI wraps an error inside a transform into ``RuntimeError("applying transform <LoadImaged ...>")``;
    the unreadable file is then only visible deep in the chained traceback. This loader finds which of
    the item's files fails (header or voxel data) and raises an error that names it and the rule;
    :func:`find_unreadable` digs it out of MONAI's wrapper (also across data-loader worker processes).
    """

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as err:
            for key in self.keys:
                value = data.get(key) if isinstance(data, Mapping) else None
                for path in [value] if isinstance(value, (str, Path)) else list(value or []):
                    try:
                        read_voxels(path, "label" if key == "label" else "image")
                    except (UnreadableImageError, FileNotFoundError) as bad:
                        raise bad from err
            raise


_UNREADABLE = re.compile(r"UnreadableImageError: (.*)")


def find_unreadable(err: BaseException) -> UnreadableImageError | FileNotFoundError | None:
    """The :class:`UnreadableImageError` (or missing file) behind ``err``, or ``None``.

    Walks the exception chain (MONAI's ``RuntimeError("applying transform ...")``) and, for errors
    re-raised from data-loader worker processes (which keep only the text of the original
    traceback), parses that text.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (UnreadableImageError, FileNotFoundError)):
            return e
        e = e.__cause__ or e.__context__
    match = _UNREADABLE.search(str(err))
    return UnreadableImageError(match.group(1).strip()) if match else None


def resampled_shape(path: str | Path, pixdim: Sequence[float] | None, orientation: str | None) -> tuple[int, ...]:
    """Spatial shape of the file at ``path`` after ``Orientationd`` and ``Spacingd``, from its header alone.

    The grid the training transforms produce before the foreground crop (within a voxel of MONAI's
    rounding). Reads no voxel data.
    """
    img = nib.load(str(path))
    shape = np.array(img.shape[:3], dtype=np.float64)
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
    if orientation is not None:
        src = nib.orientations.io_orientation(img.affine)
        dst = nib.orientations.axcodes2ornt(tuple(orientation))
        order = nib.orientations.ornt_transform(src, dst)[:, 0].astype(int)  # source axis -> target axis
        shape_t, zooms_t = np.empty(3), np.empty(3)
        shape_t[order], zooms_t[order] = shape, zooms
        shape, zooms = shape_t, zooms_t
    if pixdim is not None:
        shape = np.maximum(np.round(shape * zooms / np.asarray(pixdim, dtype=np.float64)), 1)
    return tuple(int(s) for s in shape)


def intensity_warnings(
    paths: Sequence[str | Path], intensity: str | None, a_min: float, a_max: float, max_voxels: int = 2_000_000
) -> list[str]:
    """Messages for an intensity setting that does not suit the images (empty when it looks right).

    Looks at the voxels of a few images (subsampled to ``max_voxels`` each):

    * ``"range"`` (a CT window ``[a_min, a_max]`` mapped to [0, 1]) on data without negative values
      while ``a_min < 0`` -- MRI or already-scaled data, where the window clips the anatomy --, or
      with over 90 % of the non-zero voxels outside the window;
    * ``"normalize"`` is right for MRI and fine for CT: no message;
    * ``None`` with intensities far from unit scale (|values| up to 100 and more).
    """
    messages: list[str] = []
    for path in paths:
        img = nib.load(str(path))
        data = read_voxels(path, "image", img)
        step = max(1, int(math.ceil((data.size / max_voxels) ** (1 / 3))))
        v = np.asarray(data[::step, ::step, ::step], dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        lo, hi = float(np.percentile(v, 0.5)), float(np.percentile(v, 99.5))
        if intensity == "range":
            body = v[v != 0] if np.any(v != 0) else v
            outside = float(np.mean((body < a_min) | (body > a_max)))
            if v.min() >= 0 and a_min < 0:
                messages.append(
                    f"data.intensity='range' applies the CT window [{a_min:g}, {a_max:g}], but {path} has no negative "
                    f"intensities (0.5-99.5 percentiles {lo:.4g} .. {hi:.4g}): it looks like MRI or pre-scaled data, "
                    f"where the window clips {outside:.0%} of the non-zero voxels; use data.intensity=normalize "
                    "(z-score), or set data.a_min / data.a_max to the data's range"
                )
            elif outside > 0.9:
                messages.append(
                    f"data.intensity='range' window [{a_min:g}, {a_max:g}] clips {outside:.0%} of the non-zero voxels "
                    f"of {path} (0.5-99.5 percentiles {lo:.4g} .. {hi:.4g}); set data.a_min / data.a_max to the "
                    "tissue of interest, or use data.intensity=normalize"
                )
        elif intensity is None and max(abs(lo), abs(hi)) >= 100:
            messages.append(
                f"data.intensity=null leaves the intensities of {path} unscaled (0.5-99.5 percentiles {lo:.4g} .. "
                f"{hi:.4g}); networks train best on unit-scale inputs: use data.intensity=normalize (MRI) or "
                "range (CT window)"
            )
        if messages:
            break  # one example is enough
    return messages


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
        LoadImageChecked(keys=keys, image_only=True),
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
