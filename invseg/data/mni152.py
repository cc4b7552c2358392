"""A real-MRI segmentation example that needs no download: brain tissue from the MNI152 template.

nilearn's wheel ships the ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al. 2009, 2011):
a skull-stripped 1 mm T1 and grey- and white-matter probability maps
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``). This module
turns them into a Medical Segmentation Decathlon (MSD) folder -- ``dataset.json``, ``imagesTr``,
``labelsTr``, ``imagesTs`` -- of several *different* cases, read by the same code as any MSD task.

Each case is one random, smooth re-acquisition of the template:

* **anatomy** -- a random affine (rotation up to ``max_rotation_deg`` per axis, anisotropic scale
  within ``1 +- max_scale``, translation) composed with a smooth elastic displacement (a coarse
  random field of ``elastic_mm`` standard deviation, upsampled), so no two cases share voxel
  positions of the anatomy;
* **acquisition** -- a random voxel grid: in-plane spacing in ``inplane_mm``, a thicker slice axis
  (``slice_mm``, random axis), a random field of view around the brain, and LPS or RAS storage order
  (exercises reorientation and resampling); the template is blurred to the new resolution before
  sampling (partial volume);
* **intensity** -- a smooth multiplicative bias field, a random gamma (contrast), Rician noise inside
  the brain, and a random scanner scale stored as ``int16`` (so a fixed intensity threshold does not
  transfer between cases).

Labels are ``0`` background (outside the brain and CSF), ``1`` grey matter, ``2`` white matter: the
arg-max of ``(1 - p_gm - p_wm, p_gm, p_wm)`` after the same deformation and blur, i.e. the most likely
tissue of each voxel at the case's own resolution. The probability maps come from the template's
authors (segmentations of the 152 subjects), not from thresholding this T1, so the task is a fair
tissue segmentation. All cases derive from one averaged anatomy: the example measures how well a
network learns the task under realistic variation, not how it generalises across subjects.

The source files are located with ``importlib`` without importing nilearn (which would pull in
scikit-learn and pandas). Install them with ``pip install -e ".[examples]"``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from invseg.data.synthetic import ensure_dataset
from invseg.utils import check_int

__all__ = [
    "MNI152_LABELS",
    "mni152_template_files",
    "write_mni152_tissue_decathlon",
    "ensure_mni152_tissue_decathlon",
]

PathLike = str | os.PathLike

#: Class names of the tissue task, in label order.
MNI152_LABELS = ("background", "grey_matter", "white_matter")

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_INSTALL_HINT = 'pip install -e ".[examples]" (or pip install nilearn)'


def mni152_template_files() -> dict[str, Path]:
    """Paths of the MNI152 2009a T1 and GM/WM probability maps inside the installed nilearn package.

    Returns:
        ``{"t1": path, "gm": path, "wm": path}``.

    Raises:
        FileNotFoundError: nilearn is not installed, or its wheel lacks one of the files (the
            message names it and says how to install the extra).
    """
    spec = importlib.util.find_spec("nilearn")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MNI152 example reads the template files shipped in nilearn's wheel, but nilearn is not "
            f"installed: {_INSTALL_HINT}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {key: folder / _TEMPLATE.format(key) for key in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the installed nilearn has no MNI152 2009a template file {missing[0]}; install a nilearn "
            f"release that ships it ({_INSTALL_HINT}, tested with nilearn 0.14)"
        )
    return files


def _load_source(files: Mapping[str, PathLike]) -> tuple[torch.Tensor, np.ndarray]:
    """``(3, X, Y, Z)`` float32 tensor (T1, GM, WM, each scaled to [0, 1]) and the source affine."""
    if not all(key in files for key in ("t1", "gm", "wm")):
        raise ValueError(f"source must name the files 't1', 'gm' and 'wm', got {sorted(files)}")
    arrays, affine = [], None
    for key in ("t1", "gm", "wm"):
        path = Path(files[key])
        if not path.is_file():
            raise FileNotFoundError(f"MNI152 {key} file not found: {path}")
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise ValueError(f"MNI152 {key} file {path} must be a 3D volume, got shape {data.shape}")
        if affine is None:
            affine = img.affine
            shape = data.shape
        elif data.shape != shape or not np.allclose(img.affine, affine, atol=1e-3):
            raise ValueError(f"MNI152 {key} file {path} is not on the grid of the T1 ({shape})")
        top = float(data.max())
        arrays.append(data / top if top > 0 else data)
    return torch.from_numpy(np.stack(arrays)), np.asarray(affine, dtype=np.float64)


def _gaussian_blur(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, X, Y, Z)`` with one sigma (in voxels) per axis."""
    out = volume.unsqueeze(0)  # (1, C, X, Y, Z)
    channels = volume.shape[0]
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.3:
            continue
        radius = int(math.ceil(3 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=volume.dtype)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).reshape(1, 1, -1, 1, 1).movedim(2, 2 + axis)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad counts from the last axis
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.expand(channels, 1, *kernel.shape[2:]),
                       groups=channels)
    return out[0]


def _rotation(angles: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _brain_box(source: torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space bounding box (mm) of the brain (GM + WM probability > 0.05)."""
    mask = (source[1] + source[2]) > 0.05
    idx = np.argwhere(mask.numpy())
    corners = np.array([[a, b, c, 1.0] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max()) for c in (idx[:, 2].min(), idx[:, 2].max())])
    world = corners @ affine.T
    return world[:, :3].min(0), world[:, :3].max(0)


def _case(source: torch.Tensor, src_affine: np.ndarray, rng: np.random.Generator, params: Mapping[str, Any]):
    """One random re-acquisition: ``(t1 int16 (X, Y, Z), label uint8 (X, Y, Z), affine (4, 4))``."""
    # ---- acquisition grid: spacing (one thicker slice axis), field of view, storage order
    spacing = rng.uniform(*params["inplane_mm"], size=3)
    spacing[rng.integers(3)] = rng.uniform(*params["slice_mm"])
    lo, hi = _brain_box(source, src_affine)
    margin_lo = rng.uniform(*params["margin_mm"], size=3)
    margin_hi = rng.uniform(*params["margin_mm"], size=3)
    lo, hi = lo - margin_lo, hi + margin_hi
    shape = np.maximum(np.ceil((hi - lo) / spacing).astype(int), 8)
    flips = np.array([1.0, 1.0, 1.0])
    if rng.random() < 0.5:  # LPS storage, as many scanners write it
        flips[:2] = -1.0
    out_affine = np.eye(4)
    out_affine[:3, :3] = np.diag(flips * spacing)
    out_affine[:3, 3] = np.where(flips > 0, lo, hi)

    # ---- deformation: output world point p -> template world point q = A (p - c) + c + t + d(p)
    center = 0.5 * (lo + hi)
    scale = 1.0 + rng.uniform(-params["max_scale"], params["max_scale"], size=3)
    rot = _rotation(np.deg2rad(rng.uniform(-params["max_rotation_deg"], params["max_rotation_deg"], size=3)))
    a = rot @ np.diag(1.0 / scale)
    shift = rng.uniform(-params["max_shift_mm"], params["max_shift_mm"], size=3)
    ii, jj, kk = (torch.arange(n, dtype=torch.float64) for n in shape)
    grid = torch.stack(torch.meshgrid(ii, jj, kk, indexing="ij"), dim=-1)  # (X, Y, Z, 3) output voxels
    world = grid @ torch.from_numpy(out_affine[:3, :3]).T + torch.from_numpy(out_affine[:3, 3])
    q = (world - torch.from_numpy(center)) @ torch.from_numpy(a).T + torch.from_numpy(center + shift)
    coarse = torch.from_numpy(rng.normal(0.0, params["elastic_mm"], size=(1, 3, 5, 5, 5)))
    q = q + F.interpolate(coarse, size=tuple(int(n) for n in shape), mode="trilinear",
                          align_corners=True)[0].permute(1, 2, 3, 0)
    # template voxel coordinates -> grid_sample's [-1, 1] (x, y, z) order is (W, H, D) = (Z, Y, X) reversed
    src_vox = (q - torch.from_numpy(src_affine[:3, 3])) @ torch.from_numpy(np.linalg.inv(src_affine[:3, :3])).T
    size = torch.tensor(source.shape[1:], dtype=torch.float64)
    norm = (2.0 * src_vox / (size - 1) - 1.0).flip(-1).float()

    # ---- partial volume at the new resolution, then sample T1, GM, WM together
    src_spacing = np.sqrt((src_affine[:3, :3] ** 2).sum(0))
    blurred = _gaussian_blur(source, 0.42 * np.sqrt(np.maximum((spacing / src_spacing) ** 2 - 1.0, 0.0)))
    sampled = F.grid_sample(blurred.unsqueeze(0), norm.unsqueeze(0), mode="bilinear", padding_mode="zeros",
                            align_corners=True)[0]  # (3, X, Y, Z)
    t1, gm, wm = sampled[0].double(), sampled[1].double().clamp(0, 1), sampled[2].double().clamp(0, 1)
    label = torch.stack([(1.0 - gm - wm).clamp_min(0.0), gm, wm]).argmax(0).to(torch.uint8)

    # ---- intensity: bias field, gamma, Rician noise inside the brain, scanner scale
    brain = t1 > 0.02
    u = (grid / torch.from_numpy((shape - 1).astype(np.float64))) * 2.0 - 1.0  # (X, Y, Z, 3) in [-1, 1]
    terms = [u[..., 0], u[..., 1], u[..., 2], u[..., 0] * u[..., 1], u[..., 1] * u[..., 2], u[..., 0] * u[..., 2],
             u[..., 0] ** 2, u[..., 1] ** 2, u[..., 2] ** 2]
    coeffs = rng.normal(0.0, params["bias"], size=len(terms))
    bias = torch.exp(sum(c * t for c, t in zip(coeffs, terms)))
    gamma = rng.uniform(*params["gamma"])
    signal = t1.clamp_min(0.0) ** gamma * bias
    sigma = rng.uniform(*params["noise"])
    noise = torch.from_numpy(rng.normal(0.0, sigma, size=(2, *shape)))
    signal = torch.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
    signal = torch.where(brain, signal, torch.zeros_like(signal))  # skull-stripped: zero outside the brain
    scanner = rng.uniform(*params["scanner_max"])
    image = (signal * scanner).round().clamp(0, 32767).to(torch.int16)
    return image.numpy(), label.numpy(), out_affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _defaults() -> dict[str, Any]:
    return {
        "inplane_mm": [1.0, 1.6],
        "slice_mm": [1.6, 3.0],
        "margin_mm": [2.0, 20.0],
        "max_rotation_deg": 10.0,
        "max_scale": 0.08,
        "max_shift_mm": 6.0,
        "elastic_mm": 2.5,
        "bias": 0.12,
        "gamma": [0.75, 1.35],
        "noise": [0.01, 0.04],
        "scanner_max": [600.0, 3000.0],
    }


def write_mni152_tissue_decathlon(
    root: PathLike,
    num_training: int = 12,
    num_test: int = 2,
    seed: int = 0,
    source: Mapping[str, PathLike] | None = None,
    downsample: int = 1,
    **acquisition: Any,
) -> Path:
    """Write the MNI152 brain-tissue task (see the module docstring) as an MSD folder at ``root``.

    Layout::

        root/dataset.json                 # modality {"0": "T1"}, labels background / grey / white matter
        root/imagesTr/mni152_000.nii.gz   # int16 T1, own grid and affine per case
        root/labelsTr/mni152_000.nii.gz   # uint8 labels 0, 1, 2 on the image's grid
        root/imagesTs/mni152_t000.nii.gz  # unlabelled cases, listed under "test"

    Deterministic for a given ``seed`` (each case draws from ``numpy.random.default_rng([seed, i])``).
    About 2 s and 1 MB per case.

    Args:
        root: dataset folder (created).
        num_training: labelled cases (default 12).
        num_test: unlabelled cases in ``imagesTs`` (default 2).
        seed: seed of the cases (default 0).
        source: ``{"t1", "gm", "wm"}`` NIfTI paths on one grid; default: the files of the installed
            nilearn (:func:`mni152_template_files`). Tests pass small stand-ins.
        downsample: keep every n-th template voxel per axis first (default 1); spacings scale with it.
        **acquisition: overrides of the random ranges: ``inplane_mm``, ``slice_mm``, ``margin_mm``
            (``[low, high]`` in mm), ``max_rotation_deg``, ``max_scale``, ``max_shift_mm``,
            ``elastic_mm``, ``bias``, ``gamma``, ``noise``, ``scanner_max``.

    Returns:
        The path of the written dataset.json.

    Raises:
        FileNotFoundError: the template files are missing (nilearn not installed).
        ValueError: bad counts or an unknown acquisition key.
    """
    for name, value, low in (("num_training", num_training, 1), ("num_test", num_test, 0),
                             ("downsample", downsample, 1)):
        check_int(value, name, low)
    params = _defaults()
    unknown = sorted(set(acquisition) - set(params))
    if unknown:
        raise ValueError(f"unknown acquisition setting {unknown[0]!r}; known: {', '.join(params)}")
    params.update(acquisition)
    files = dict(source) if source is not None else mni152_template_files()
    volume, affine = _load_source(files)
    if downsample > 1:
        volume = volume[:, ::downsample, ::downsample, ::downsample].contiguous()
        affine = affine.copy()
        affine[:3, :3] *= downsample
        params = {**params, **{k: [v * downsample for v in params[k]] for k in ("inplane_mm", "slice_mm")}}

    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for i in range(num_training + num_test):
        image, label, case_affine = _case(volume, affine, np.random.default_rng([seed, i]), params)
        if i < num_training:
            name = f"mni152_{i:03d}.nii.gz"
            _save(image, case_affine, root / "imagesTr" / name)
            _save(label, case_affine, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            name = f"mni152_t{i - num_training:03d}.nii.gz"
            _save(image, case_affine, root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "MNI152Tissue",
        "description": "Grey / white matter on random re-acquisitions of the ICBM 2009a nonlinear symmetric "
                       "MNI152 template (invseg.data.mni152: deformation, resampling, bias, contrast, noise)",
        "reference": "Fonov et al., NeuroImage 54(1) 2011 and NeuroImage 47 S102 2009; template files from nilearn",
        "licence": "ICBM 2009a: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
                   "Neurological Institute, McGill University; free use with this notice",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(i): name for i, name in enumerate(MNI152_LABELS)},
        "numTraining": num_training,
        "numTest": num_test,
        "training": training,
        "test": test,
        "generator": {"kind": "mni152_tissue", "num_training": num_training, "num_test": num_test, "seed": seed,
                      "downsample": downsample, **params},
    }
    path = root / "dataset.json"
    tmp = root / "dataset.json.partial"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)
    return path


def ensure_mni152_tissue_decathlon(root: PathLike, **kwargs: Any) -> Path:
    """``root/dataset.json`` of the MNI152 tissue task, written first (atomically) if missing.

    Same contract as :func:`invseg.data.ensure_synthetic_decathlon`: the folder appears only when
    complete; a folder written with other explicit parameters raises ``ValueError``.

    Args:
        root: dataset folder.
        **kwargs: arguments of :func:`write_mni152_tissue_decathlon`.
    """
    return ensure_dataset(root, write_mni152_tissue_decathlon, kwargs, params_key="generator")
