"""Data preparation of the 3D segmentation trainer: the dataset (synthetic default written on first use),
validation of every case before training, the patch size against the network and the resampled volumes,
the transform settings, and the start-of-run summary. Each error names the file or key and the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch.distributed as dist
from torch import nn

from invseg.data import (
    ensure_mni152_tissue_decathlon,
    ensure_synthetic_decathlon,
    find_unreadable,
    prepare_decathlon,
    resampled_shape,
)
from invseg.layers import spectral_layers
from invseg.train.distributed import DistributedContext, barrier, unwrap_model
from invseg.train.seg_config import DataConfig, SegConfig

__all__ = [
    "resolve_dataset_json",
    "prepare_seg_data",
    "required_multiple",
    "check_patch_size",
    "check_patch_fits",
    "first_image_path",
    "resampled_grids",
    "seg_transform_kwargs",
    "naming_unreadable_files",
    "describe_run",
]


def resolve_dataset_json(data: DataConfig, ctx: DistributedContext | None = None) -> Path:
    """``data.dataset_json``, or the synthetic dataset (written by rank 0 on first use, then a barrier)."""
    if data.dataset_json is not None:
        return Path(data.dataset_json)
    if data.example == "mni152_tissue":
        ensure: Any = ensure_mni152_tissue_decathlon
        kwargs: dict[str, Any] = dict(num_training=data.synthetic_num_volumes, seed=data.synthetic_seed)
    else:
        ensure = ensure_synthetic_decathlon
        kwargs = dict(num_volumes=data.synthetic_num_volumes, size=tuple(data.synthetic_size),
                      num_classes=data.synthetic_num_classes, seed=data.synthetic_seed)
    if ctx is None or ctx.is_main:
        if not (Path(data.synthetic_root) / "dataset.json").is_file():
            print(f"writing the {data.example} example dataset to {data.synthetic_root} (first use)", flush=True)
        path = ensure(data.synthetic_root, **kwargs)
    barrier()
    if ctx is not None and not ctx.is_main:
        path = ensure(data.synthetic_root, **kwargs)  # exists now: only checks
    return path


def prepare_seg_data(
    data: DataConfig, ctx: DistributedContext | None = None
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, validate and split dataset.json (synthetic default written first).

    Validation runs on rank 0 only; an error there is re-raised on every rank with the same type
    and message (so no rank waits forever at a collective).

    Returns:
        ``(train_list, val_list, info)`` as :func:`invseg.data.prepare_decathlon`.

    Raises:
        FileNotFoundError: A listed file (or dataset.json) is missing.
        ValueError: Any other rule of :func:`invseg.data.validate_datalist`, or an empty list.
    """
    path = resolve_dataset_json(data, ctx)
    distributed = ctx is not None and ctx.distributed and dist.is_available() and dist.is_initialized()
    result: Any = None
    error: tuple[str, str] | None = None
    if ctx is None or ctx.is_main:
        try:
            result = prepare_decathlon(path, val_fraction=data.val_fraction, seed=data.split_seed,
                                       num_val=data.num_val, validate=True, check_values=data.check_values)
        except (FileNotFoundError, ValueError) as err:
            if not distributed:
                raise
            error = (type(err).__name__, str(err))
    if distributed:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
        if error is not None:
            raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
    train, val, info = result
    if not val:
        raise ValueError(
            f"{path}: the split leaves no validation case (data.val_fraction={data.val_fraction}, "
            f"data.num_val={data.num_val}); validation needs at least one"
        )
    return train, val, info


def required_multiple(model: nn.Module) -> tuple[int, str]:
    """The multiple every input size must be of, and why (``(m, reason)``)."""
    net = unwrap_model(model)
    if hasattr(net, "size_multiple"):
        why = f"2**(levels - 1) for {len(net.channels)} invertible levels"
        if getattr(net, "stem_stride", 1) > 1:
            why = f"stem_stride {net.stem_stride} x 2**(levels - 1) for {len(net.channels)} invertible levels"
        return int(net.size_multiple), why
    strides = getattr(net, "strides", None)
    if strides is not None:
        m = int(np.prod([int(np.max(s)) for s in strides]))
        return m, f"the product of the strides {list(strides)}"
    return 1, "no constraint known"


def check_patch_size(model: nn.Module, patch_size: Sequence[int], key: str = "data.patch_size") -> None:
    """Raise ValueError unless every entry of ``patch_size`` is a multiple of what ``model`` needs."""
    m, reason = required_multiple(model)
    patch = tuple(int(p) for p in patch_size)
    if any(p % m for p in patch):
        fixed = tuple(max(m, round(p / m) * m) for p in patch)
        raise ValueError(
            f"{key} = {list(patch)} cannot be taken by the network: every size must be a multiple of {m} "
            f"({reason}); e.g. {list(fixed)}. The sliding-window roi of validation is the same patch size."
        )


def first_image_path(value: Any) -> str:
    """The (first) image file of a datalist entry's ``"image"`` (a path or a list of per-modality paths)."""
    return str(value[0] if isinstance(value, (list, tuple)) else value)


def resampled_grids(datalist: Sequence[dict], data: DataConfig) -> list[tuple[int, ...]]:
    """Header-only grid of every case after reorientation and resampling (before the foreground crop)."""
    return [resampled_shape(first_image_path(item["image"]), data.pixdim, data.orientation) for item in datalist]


def check_patch_fits(grids: Sequence[Sequence[int]], names: Sequence[str], data: DataConfig, multiple: int = 1,
                     key: str = "data.patch_size") -> list[str]:
    """Refuse a patch larger than every resampled volume along some axis; warn when it exceeds some.

    Volumes smaller than the patch are zero-padded to it before patches are drawn, so a patch that
    exceeds *every* volume along an axis trains mostly on padding (``ValueError`` naming the
    smallest grid and a patch that fits). When it exceeds only some volumes a message is returned
    (the caller warns).

    Args:
        grids: spatial shape of each case after ``data.orientation`` / ``data.pixdim``
            (e.g. from :func:`invseg.data.resampled_shape`).
        names: a name per case (its image file), for the messages.
        data: the data config (patch size and pixdim, for the message).
        multiple: what every patch size must be a multiple of (the network's constraint).
        key: config key named in the messages.

    Returns:
        Warning messages (empty when the patch fits every case).
    """
    patch = tuple(int(p) for p in data.patch_size)
    over = [(n, tuple(g)) for n, g in zip(names, grids) if any(p > s for p, s in zip(patch, g))]
    if not over:
        return []
    smallest = tuple(min(int(g[i]) for g in grids) for i in range(3))
    fit = [max(multiple, (s // multiple) * multiple) for s in smallest]
    grid_of = f"data.pixdim={data.pixdim}" if data.pixdim is not None else "the native grid"
    axes = [i for i in range(3) if all(patch[i] > int(g[i]) for g in grids)]
    if axes:
        raise ValueError(
            f"{key} = {list(patch)} is larger than every volume along axis {axes[0]} after resampling to "
            f"{grid_of} (smallest grid {list(smallest)} voxels): training would sample mostly zero padding. "
            f"Use a patch of at most {fit} (multiples of {multiple}) or a finer data.pixdim"
        )
    name, grid = over[0]
    return [f"{key} = {list(patch)} is larger than {len(over)} of {len(grids)} volumes after resampling to "
            f"{grid_of} (e.g. {name}: {list(grid)} voxels); those are zero-padded to the patch. A patch of at "
            f"most {fit} fits every volume"]


def seg_transform_kwargs(data: DataConfig) -> dict[str, Any]:
    """The arguments of :func:`invseg.data.seg_train_transforms` / ``seg_val_transforms`` that ``data`` sets."""
    return dict(pixdim=data.pixdim, orientation=data.orientation, intensity=data.intensity, a_min=data.a_min,
                a_max=data.a_max, crop_foreground=data.crop_foreground)


@contextmanager
def naming_unreadable_files():
    """Turn MONAI's ``RuntimeError("applying transform <LoadImaged ...>")`` into the error naming the file."""
    try:
        yield
    except RuntimeError as err:
        bad = find_unreadable(err)
        if bad is None:
            raise
        raise bad from None


def _native_spacing(path: str) -> tuple[float, ...]:
    affine = nib.load(path).affine
    return tuple(float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))


def describe_run(cfg: SegConfig, path: Path, train_list: Sequence[dict], val_list: Sequence[dict],
                 info: dict[str, Any], model: nn.Module, grids: Sequence[Sequence[int]]) -> str:
    """The start-of-run summary: data, split, channels and classes, grid, patch, model and schedule."""
    d, m, t = cfg.data, cfg.model, cfg.train
    n = len(train_list) + len(val_list)
    split = f"data.num_val={d.num_val}" if d.num_val is not None else f"data.val_fraction={d.val_fraction}"
    modalities = ", ".join(info.get("modality_names", [])) or "?"
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(info.get("label_names", [])))
    lo = [min(int(g[i]) for g in grids) for i in range(3)]
    hi = [max(int(g[i]) for g in grids) for i in range(3)]
    sample = [_native_spacing(first_image_path(item["image"])) for item in list(train_list)[:8]]
    native = f"{min(min(s) for s in sample):.2g}-{max(max(s) for s in sample):.2g} mm" if sample else "?"
    target = "x".join(f"{p:g}" for p in d.pixdim) + " mm" if d.pixdim is not None else "the native spacing"
    patch = "x".join(map(str, d.patch_size))
    params = sum(p.numel() for p in model.parameters())
    net = f"{m.name} ({', '.join(f'{k}={v}' for k, v in m.kwargs.items())})"
    sn = [layer for layer in spectral_layers(model) if layer.method != "none"]
    net += f", SN {sn[0].method} ({sn[0].sn_mode})" if sn else ", no SN"
    lines = [
        f"data: {info.get('name', '?')} ({path}): {n} labelled cases -> {len(train_list)} train, "
        f"{len(val_list)} validation ({split}, split seed {d.split_seed})",
        f"  channels: {info.get('num_modalities')} ({modalities}); classes: {classes}",
        f"  grid: native spacing {native}; {'resampled to ' + target if d.pixdim is not None else 'not resampled'}, "
        f"orientation {d.orientation}: "
        f"{'x'.join(map(str, lo))} .. {'x'.join(map(str, hi))} voxels before the foreground crop",
        f"  patches: {patch}, {d.num_samples} per volume x {t.batch_size} volume(s) = "
        f"{d.num_samples * t.batch_size} per step; intensity: {d.intensity}",
        f"model: {net}: {params:,} parameters",
        f"train: {t.max_steps} steps, {t.optimizer} lr {t.lr:g} ({t.scheduler}), {t.precision}; "
        f"validation every {t.val_every} steps",
    ]
    return "\n".join(lines)
