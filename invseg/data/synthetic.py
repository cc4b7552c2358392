"""Synthetic 3D segmentation data written in the Medical Segmentation Decathlon format.

Volumes come from ``monai.data.synthetic.create_test_image_3d`` (random spheres on noise) and are
written with nibabel as ``.nii.gz`` with a real affine (voxel spacing on the diagonal, origin at
minus half the field of view), plus an MSD ``dataset.json``. The result is read by exactly the same
code path as a real MSD task (:mod:`invseg.data.decathlon`, :mod:`invseg.data.transforms`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d

__all__ = ["write_synthetic_decathlon", "ensure_synthetic_decathlon"]

PathLike = str | os.PathLike

_MODALITY_NAMES = ("MRI", "T1w", "T2w", "FLAIR", "CT", "PD")


def _nifti(data: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> nib.Nifti1Image:
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)  # scanner coordinates, as in MSD files
    img.set_sform(affine, code=1)
    return img


def _defaults(size: Sequence[int], num_objs, rad_max, rad_min):
    smallest = min(size)
    if rad_max is None:
        rad_max = max(3, smallest // 4 - 1)  # 64 -> 15, 24 -> 5
    if rad_min is None:
        rad_min = max(2, rad_max // 2)
    if num_objs is None:
        num_objs = 6
    return int(num_objs), int(rad_max), int(rad_min)


def write_synthetic_decathlon(
    root: PathLike,
    num_volumes: int = 8,
    size: Sequence[int] = (64, 64, 64),
    num_classes: int = 2,
    num_modalities: int = 1,
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    seed: int = 0,
    num_objs: int | None = None,
    rad_max: int | None = None,
    rad_min: int | None = None,
    noise_max: float = 0.2,
) -> Path:
    """Write a synthetic MSD-format segmentation dataset to ``root``; overwrite files of the same name.

    Layout written (``root`` is created if needed)::

        root/dataset.json
        root/imagesTr/synth_000.nii.gz   # float32, (X, Y, Z) or (X, Y, Z, num_modalities)
        root/labelsTr/synth_000.nii.gz   # uint8, (X, Y, Z), values 0 .. num_classes - 1

    Each volume holds ``num_objs`` spheres; with ``num_classes == 2`` the label is binary (object vs
    background), otherwise every sphere gets a random class in 1 .. num_classes - 1 and its
    intensity depends on the class. Modality 0 is the ``create_test_image_3d`` image; further
    modalities show the same label map with other per-class contrasts and independent noise, so
    each modality carries information. Deterministic for a given ``seed``.

    Args:
        root: dataset folder.
        num_volumes: number of training cases (default 8).
        size: spatial shape (X, Y, Z) (default (64, 64, 64)); each side must exceed ``2 * rad_max``.
        num_classes: classes including background, >= 2 (default 2).
        num_modalities: image channels, >= 1 (default 1); > 1 writes 4D images.
        spacing: voxel size in mm (default (1.5, 1.5, 2.0)), written into the affine and header.
        seed: random seed (default 0).
        num_objs: spheres per volume (default 6).
        rad_max: maximum sphere radius in voxels (default ``max(3, min(size) // 4 - 1)``).
        rad_min: minimum sphere radius (default ``max(2, rad_max // 2)``).
        noise_max: amplitude of the uniform background noise (default 0.2).

    Returns:
        The path of the written dataset.json.

    Raises:
        ValueError: for invalid sizes, counts or radii.
    """
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be three positive ints (X, Y, Z), got {size}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive floats in mm, got {spacing}")
    if num_volumes < 1:
        raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
    if num_classes < 2 or num_classes > 255:
        raise ValueError(f"num_classes must be in [2, 255] (uint8 labels), got {num_classes}")
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    if noise_max < 0:
        raise ValueError(f"noise_max must be >= 0, got {noise_max}")
    num_objs, rad_max, rad_min = _defaults(size, num_objs, rad_max, rad_min)
    if not 1 <= rad_min < rad_max or min(size) <= 2 * rad_max:
        raise ValueError(
            f"need 1 <= rad_min < rad_max and min(size) > 2 * rad_max, got rad_min={rad_min}, "
            f"rad_max={rad_max}, size={size}"
        )

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    origin = [-(n * s) / 2.0 for n, s in zip(size, spacing)]
    training = []
    for i in range(num_volumes):
        image, label = create_test_image_3d(
            *size,
            num_objs=num_objs,
            rad_max=rad_max,
            rad_min=rad_min,
            noise_max=noise_max,
            # with 1 segmentation class monai draws binary spheres of random brightness
            num_seg_classes=num_classes - 1,
            random_state=rs,
        )
        label = (label > 0) if num_classes == 2 else label
        label = label.astype(np.uint8)
        channels = [image.astype(np.float32)]
        for _ in range(1, num_modalities):
            # same anatomy, another contrast: random level per class (background 0) + noise
            levels = np.concatenate([[0.0], rs.uniform(0.3, 1.0, size=num_classes - 1)])
            extra = np.maximum(levels[label], rs.uniform(0.0, noise_max, size=label.shape))
            channels.append(extra.astype(np.float32))
        data = channels[0] if num_modalities == 1 else np.stack(channels, axis=-1)  # MSD: modalities last
        name = f"synth_{i:03d}.nii.gz"
        nib.save(_nifti(data, spacing, origin), str(root / "imagesTr" / name))
        nib.save(_nifti(label, spacing, origin), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})

    meta = {
        "name": "Synthetic",
        "description": "Synthetic spheres from monai.data.synthetic.create_test_image_3d (invseg)",
        "reference": "invseg",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D" if num_modalities == 1 else "4D",
        "modality": {
            str(m): _MODALITY_NAMES[m] if m < len(_MODALITY_NAMES) else f"modality{m}" for m in range(num_modalities)
        },
        "labels": {"0": "background", **{str(c): f"class{c}" for c in range(1, num_classes)}},
        "numTraining": num_volumes,
        "numTest": 0,
        "training": training,
        "test": [],
        # generator parameters, so that ensure_synthetic_decathlon can detect a stale dataset
        "synthetic": _params(num_volumes, size, num_classes, num_modalities, spacing, seed, num_objs, rad_max,
                             rad_min, noise_max),
    }
    path = root / "dataset.json"
    tmp = root / "dataset.json.partial"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, path)
    return path


def _params(num_volumes, size, num_classes, num_modalities, spacing, seed, num_objs, rad_max, rad_min,
            noise_max) -> dict[str, Any]:
    return {
        "num_volumes": int(num_volumes),
        "size": [int(s) for s in size],
        "num_classes": int(num_classes),
        "num_modalities": int(num_modalities),
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
        "num_objs": int(num_objs),
        "rad_max": int(rad_max),
        "rad_min": int(rad_min),
        "noise_max": float(noise_max),
    }


def ensure_synthetic_decathlon(root: PathLike, **kwargs: Any) -> Path:
    """Return ``root/dataset.json``, writing a synthetic dataset there first if it is missing.

    The default dataset on first use. The data are written into a temporary sibling folder that is
    renamed to ``root`` only when complete, so an interrupted write is never taken as done (a
    leftover ``.<name>.partial-*`` folder can be deleted). If two processes race, the first rename
    wins and the other's copy is discarded; in distributed training still call it on one rank and
    wait at a barrier.

    Args:
        root: dataset folder; must not exist, be empty, or already hold a dataset.json.
        **kwargs: arguments of :func:`write_synthetic_decathlon`.

    Returns:
        The path of dataset.json.

    Raises:
        FileExistsError: ``root`` is a non-empty folder without dataset.json (it is not touched).
        ValueError: ``root/dataset.json`` was written by this generator with different parameters
            than those passed explicitly in ``kwargs``.
    """
    return ensure_dataset(root, write_synthetic_decathlon, kwargs, params_key="synthetic")


def ensure_dataset(root: PathLike, writer: Any, kwargs: dict[str, Any], params_key: str) -> Path:
    """Write a generated MSD folder with ``writer(tmp, **kwargs)`` unless ``root/dataset.json`` exists.

    The shared first-use logic of the generated datasets (see :func:`ensure_synthetic_decathlon`):
    an atomic rename of a complete temporary sibling folder, and a check that an existing folder
    was written with the explicitly passed parameters (stored under ``params_key`` in dataset.json).
    """
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(
                f"{root} exists and is not an empty folder but has no dataset.json; refusing to write "
                "generated data into it (delete it or choose another data root)"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        # not tempfile.mkdtemp: its 0o700 mode would become the dataset folder's mode
        tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            writer(tmp, **kwargs)
            try:
                os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a non-empty one
            except OSError:
                if not path.is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _check_params(path, kwargs, params_key)
    return path


def _check_params(path: Path, kwargs: dict[str, Any], params_key: str = "synthetic") -> None:
    with open(path) as f:
        stored = json.load(f).get(params_key)
    if not isinstance(stored, dict):
        return  # real (or foreign) data: nothing to compare
    for key, value in kwargs.items():
        if key not in stored or value is None:
            continue
        want = [float(v) for v in value] if isinstance(value, (list, tuple)) else value
        have = [float(v) for v in stored[key]] if isinstance(stored[key], list) else stored[key]
        if want != have:
            raise ValueError(
                f"{path} holds generated data written with {key}={stored[key]!r}, requested {value!r}; "
                "delete the folder to regenerate or choose another data root"
            )
