"""Medical Segmentation Decathlon (MSD) datasets: dataset.json, validation and train/val split.

The MSD on-disk layout is::

    root/dataset.json          # name, modality {"0": "MRI", ...}, labels {"0": "background", ...},
                               # training [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]
    root/imagesTr/*.nii.gz     # (X, Y, Z) or (X, Y, Z, M) for M modalities stacked on the last axis
    root/labelsTr/*.nii.gz     # (X, Y, Z) integer labels in 0 .. num_classes - 1

File lists always come from dataset.json (via ``monai.data.load_decathlon_datalist``), never from a
glob: the official archives contain macOS ``._*`` resource files next to every volume.

:func:`validate_datalist` reads every header (and, by default, every voxel) with nibabel *before*
training so that a broken case stops the run at once with a message naming the file and the rule,
instead of failing after hours inside a worker process.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

__all__ = [
    "UnreadableImageError",
    "read_voxels",
    "load_datalist",
    "read_dataset_info",
    "validate_datalist",
    "split_datalist",
    "prepare_decathlon",
]

PathLike = str | os.PathLike


def _read_json(dataset_json: PathLike) -> dict[str, Any]:
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset.json not found: {path} (expected the Medical Segmentation Decathlon layout "
            "root/dataset.json with root/imagesTr/*.nii.gz and root/labelsTr/*.nii.gz)"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (MSD dataset.json), got {type(data).__name__}")
    return data


def load_datalist(
    dataset_json: PathLike, key: str = "training", base_dir: PathLike | None = None
) -> list[dict[str, Any]]:
    """Read one file list of an MSD dataset.json with ``monai.data.load_decathlon_datalist``.

    Relative paths (``"./imagesTr/x.nii.gz"``) are resolved against ``base_dir``, by default the
    folder of the JSON file. Files that exist on disk but are not listed (e.g. ``._x.nii.gz``) are
    ignored. Files are *not* checked here; see :func:`validate_datalist`.

    Args:
        dataset_json: path of dataset.json.
        key: which list to read: "training" (default), "validation" or "test".
        base_dir: folder the relative paths are relative to; default: the JSON's folder.

    Returns:
        A list of dicts with absolute ``"image"`` (and ``"label"`` for training lists) paths.

    Raises:
        FileNotFoundError: if ``dataset_json`` does not exist.
        ValueError: if the JSON is malformed, has no list under ``key``, or that list is empty.
    """
    data = _read_json(dataset_json)
    if key not in data:
        raise ValueError(f"{dataset_json} has no '{key}' list (keys present: {sorted(data)})")
    items = data[key]
    if not isinstance(items, list):
        raise ValueError(f"'{key}' in {dataset_json} must be a list, got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError(f"'{key}' list in {dataset_json} is empty: a dataset needs at least one case")
    try:
        return load_decathlon_datalist(
            dataset_json, is_segmentation=True, data_list_key=key, base_dir=base_dir
        )
    except TypeError as err:  # an entry that is not a dict
        raise ValueError(f"malformed '{key}' list in {dataset_json}: {err}") from err


def read_dataset_info(dataset_json: PathLike) -> dict[str, Any]:
    """Summarise the metadata of an MSD dataset.json.

    Args:
        dataset_json: path of dataset.json.

    Returns:
        A dict with ``name`` (str), ``num_classes`` (int, background included, from the "labels"
        dict), ``label_names`` (list of str in class order), ``num_modalities`` (int, from the
        "modality" dict), ``modality_names`` (list of str), ``num_training`` and ``num_test``
        (lengths of the lists).

    Raises:
        FileNotFoundError: if ``dataset_json`` does not exist.
        ValueError: if "labels" or "modality" are missing or not keyed 0 .. n-1.
    """
    data = _read_json(dataset_json)

    def indexed(field: str) -> list[str]:
        entries = data.get(field)
        if not isinstance(entries, Mapping) or len(entries) == 0:
            raise ValueError(
                f"{dataset_json} needs a non-empty '{field}' object keyed by index, "
                f'e.g. {{"0": "...", "1": "..."}}, got {entries!r}'
            )
        try:
            by_index = {int(k): str(v) for k, v in entries.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"'{field}' keys in {dataset_json} must be integers, got {list(entries)}") from err
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(
                f"'{field}' keys in {dataset_json} must be 0 .. {len(by_index) - 1} without gaps, "
                f"got {sorted(by_index)}"
            )
        return [by_index[i] for i in range(len(by_index))]

    label_names = indexed("labels")
    modality_names = indexed("modality")
    return {
        "name": str(data.get("name", Path(dataset_json).parent.name)),
        "num_classes": len(label_names),
        "label_names": label_names,
        "num_modalities": len(modality_names),
        "modality_names": modality_names,
        "num_training": len(data.get("training", []) or []),
        "num_test": len(data.get("test", []) or []),
    }


def _as_paths(value: Any, key: str, index: int) -> list[Path]:
    # LoadImaged accepts one path or a list of paths (stacked as channels); support both.
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    if isinstance(value, Sequence) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [Path(v) for v in value]
    raise ValueError(f"datalist entry {index}: '{key}' must be a file path or a list of paths, got {value!r}")


class UnreadableImageError(ValueError):
    """A listed image or label file cannot be read: missing voxel data, a truncated or corrupt file.

    The message names the file and the rule (every listed file must be a complete NIfTI image), so
    trainers can show it instead of the traceback of the loader that met it.
    """


#: What nibabel / gzip / zlib raise on a file whose voxel data are cut short or damaged.
_READ_ERRORS = (EOFError, OSError, ValueError, zlib.error, MemoryError)


def read_voxels(path: PathLike, role: str = "image", image: Any = None) -> np.ndarray:
    """All voxels of a NIfTI file, or :class:`UnreadableImageError` naming the file and the rule.

    Args:
        path: the file.
        role: what the file is, for the message ("image", "label").
        image: the file's already loaded nibabel image (header), if any.

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the header or the voxel data cannot be read (e.g. a ``.nii.gz``
            truncated after an intact header: ``EOFError`` from gzip).
    """
    path = Path(path)
    if image is None:
        image = _load_header(path, role)
    try:
        return np.asanyarray(image.dataobj)
    except _READ_ERRORS as err:
        reason = str(err).strip().replace("\n", " ") or type(err).__name__
        raise UnreadableImageError(
            f"{role} file {path} cannot be read: its header is intact but its voxel data are not "
            f"({type(err).__name__}: {reason}). Every image and label must be a complete NIfTI file; this "
            "one was probably cut short while copying or downloading: copy it again (or leave it out: remove its "
            "case from dataset.json, or the file from the folder you predict)"
        ) from err


def _load_header(path: Path, role: str) -> nib.spatialimages.SpatialImage:
    if not path.is_file():
        raise FileNotFoundError(f"{role} file not found: {path}")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise UnreadableImageError(
            f"{role} file {path} is not a readable NIfTI image ({type(err).__name__}: {err}); every file "
            "listed in dataset.json must be a complete NIfTI image (.nii or .nii.gz)"
        ) from err


def validate_datalist(
    datalist: Sequence[Mapping[str, Any]],
    num_classes: int,
    check_values: bool = True,
    num_modalities: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    affine_atol: float = 1e-3,
) -> None:
    """Check every case of a segmentation datalist before training; raise on the first problem.

    Rules (each error names the offending file and the rule):

    - the image and label files exist and are readable NIfTI (``FileNotFoundError`` / ``ValueError``);
    - the image is 3D, or 4D with modalities on the last axis; with ``num_modalities`` given, the
      number of channels (last axis, or the number of files in a list) must match;
    - the label is 3D (a trailing singleton axis is accepted);
    - the spatial shape (first three axes) of image and label are equal;
    - the affines agree within ``affine_atol`` (``np.allclose``), i.e. same grid in world space;
    - with ``check_values``: every image intensity is finite (no NaN/inf) and every label value is an
      integer in ``0 .. num_classes - 1``. This reads all voxels (one file at a time); pass
      ``check_values=False`` for a header-only check.

    Args:
        datalist: entries with ``image_key`` and ``label_key`` paths, e.g. from :func:`load_datalist`.
        num_classes: number of declared classes, background included (the "labels" dict of
            dataset.json).
        check_values: also read the voxel data (default True).
        num_modalities: expected number of image channels; None skips the check.
        image_key: key of the image path (default "image").
        label_key: key of the label path (default "label").
        affine_atol: absolute tolerance for comparing affines, in mm (default 1e-3).

    Raises:
        FileNotFoundError: a listed file is missing.
        ValueError: any other rule above is broken, or the datalist is empty.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    if num_modalities is not None and num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1 or None, got {num_modalities}")
    if len(datalist) == 0:
        raise ValueError("datalist is empty: a dataset needs at least one case")

    for index, item in enumerate(datalist):
        for key in (image_key, label_key):
            if key not in item:
                raise ValueError(f"datalist entry {index} has no '{key}' key: {dict(item)!r}")
        image_paths = _as_paths(item[image_key], image_key, index)
        label_paths = _as_paths(item[label_key], label_key, index)
        if len(label_paths) != 1:
            raise ValueError(f"datalist entry {index}: '{label_key}' must be one file, got {len(label_paths)}")
        label_path = label_paths[0]
        label = _load_header(label_path, "label")
        label_shape = tuple(label.shape)
        if len(label_shape) == 4 and label_shape[3] == 1:
            label_shape = label_shape[:3]
        if len(label_shape) != 3:
            raise ValueError(f"label {label_path} must be a 3D volume, got shape {tuple(label.shape)}")

        channels = 0
        for image_path in image_paths:
            image = _load_header(image_path, "image")
            shape = tuple(image.shape)
            if len(shape) not in (3, 4) or (len(image_paths) > 1 and len(shape) != 3):
                raise ValueError(
                    f"image {image_path} must be 3D (X, Y, Z) or 4D (X, Y, Z, modalities) "
                    f"(3D when the entry lists one file per modality), got shape {shape}"
                )
            channels += 1 if len(shape) == 3 else shape[3]
            if shape[:3] != label_shape:
                raise ValueError(
                    f"image {image_path} and label {label_path} must have the same spatial shape, "
                    f"got {shape[:3]} and {label_shape}"
                )
            if not np.allclose(image.affine, label.affine, atol=affine_atol):
                raise ValueError(
                    f"image {image_path} and label {label_path} must have the same affine "
                    f"(within {affine_atol} mm), got\n{np.round(image.affine, 4)}\nand\n"
                    f"{np.round(label.affine, 4)}"
                )
            if check_values:
                data = read_voxels(image_path, "image", image)
                if not np.all(np.isfinite(data)):
                    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
                    raise ValueError(f"image {image_path} must have finite intensities, found {bad} NaN/inf voxels")
                del data
        if num_modalities is not None and channels != num_modalities:
            raise ValueError(
                f"image {image_paths[0] if len(image_paths) == 1 else [str(p) for p in image_paths]} "
                f"must have {num_modalities} modalities (dataset.json 'modality'), got {channels}"
            )
        if check_values:
            values = np.unique(read_voxels(label_path, "label", label))
            if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
                raise ValueError(
                    f"label {label_path} must hold integer class indices, got values {values[:10].tolist()}"
                )
            outside = values[(values < 0) | (values >= num_classes)]
            if outside.size:
                raise ValueError(
                    f"label {label_path} has values {outside.astype(np.int64).tolist()} outside the "
                    f"declared classes 0 .. {num_classes - 1} (dataset.json 'labels')"
                )


def split_datalist(
    datalist: Sequence[Mapping[str, Any]],
    val_fraction: float = 0.2,
    seed: int = 0,
    num_val: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a datalist into training and validation cases, deterministically.

    The cases are permuted with ``numpy.random.default_rng(seed)`` (no global RNG is touched); each
    part keeps the original order of its cases. Same inputs, same split, on every rank and run.

    Args:
        datalist: the cases.
        val_fraction: fraction of cases for validation, in [0, 1) (default 0.2); rounded to the
            nearest count, at least one case when > 0. Ignored when ``num_val`` is given.
        seed: seed of the permutation (default 0).
        num_val: exact number of validation cases, in [0, len(datalist) - 1]; default None.

    Returns:
        ``(train, val)``: lists of (shallow-copied) entries; ``train`` is never empty.

    Raises:
        ValueError: if the datalist is empty or the requested split leaves no training case.
    """
    n = len(datalist)
    if n == 0:
        raise ValueError("cannot split an empty datalist")
    if num_val is None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        num_val = int(round(val_fraction * n))
        if val_fraction > 0:
            num_val = max(num_val, 1)
    if not 0 <= num_val <= n - 1:
        raise ValueError(
            f"num_val must be in [0, {n - 1}] so that at least one training case remains "
            f"(datalist has {n} cases), got {num_val}"
        )
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:num_val].tolist())
    train = [dict(item) for i, item in enumerate(datalist) if i not in val_idx]
    val = [dict(item) for i, item in enumerate(datalist) if i in val_idx]
    return train, val


def prepare_decathlon(
    dataset_json: PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_val: int | None = None,
    validate: bool = True,
    check_values: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Read, validate and split the training list of an MSD dataset.json in one call.

    Args:
        dataset_json: path of dataset.json.
        val_fraction: see :func:`split_datalist` (default 0.2).
        seed: split seed (default 0).
        num_val: exact number of validation cases (default None: use ``val_fraction``).
        validate: run :func:`validate_datalist` on all cases first (default True).
        check_values: passed to :func:`validate_datalist` (default True: read every voxel).

    Returns:
        ``(train_list, val_list, info)`` with ``info`` from :func:`read_dataset_info`.
    """
    info = read_dataset_info(dataset_json)
    datalist = load_datalist(dataset_json, key="training")
    if validate:
        validate_datalist(
            datalist, info["num_classes"], check_values=check_values, num_modalities=info["num_modalities"]
        )
    train, val = split_datalist(datalist, val_fraction=val_fraction, seed=seed, num_val=num_val)
    return train, val, info
