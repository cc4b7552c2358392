"""Evaluation and prediction of the 3D segmentation trainer: the invertibility guard's number (the library
checker :func:`invseg.blocks.reconstruction_error` on the IUNet core),
whole-volume Dice by sliding-window inference, loading a trained checkpoint, and writing predicted label
volumes on the input's grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from invseg.blocks import reconstruction_error
from invseg.config import from_dict
from invseg.data import UnreadableImageError, seg_val_transforms
from invseg.train.amp import autocast_context
from invseg.train.checkpoint import load_checkpoint
from invseg.train.distributed import unwrap_model
from invseg.train.seg_config import SegConfig, build_seg_model
from invseg.train.seg_data import naming_unreadable_files, seg_transform_kwargs

__all__ = [
    "guard_error",
    "evaluate_seg",
    "load_seg_checkpoint",
    "invert_to_input",
    "collect_inputs",
    "predict_volumes",
]


@torch.no_grad()
def guard_error(model: nn.Module, x: torch.Tensor) -> float:
    """The invertibility guard's number: the relative reconstruction error of the IUNet's invertible core
    on ``h = input_layer(x)``, ``max_b ||h_b - core^-1(core(h_b))|| / ||h_b||``, by the library checker
    :func:`invseg.blocks.reconstruction_error` on the core as it trains (eval mode, float32 input, no
    autocast: the guard measures the network, not the precision).

    Raises:
        ValueError: If the model has no invertible core (``input_layer`` and ``core.inverse``).
    """
    net = unwrap_model(model)
    if not (hasattr(net, "input_layer") and hasattr(getattr(net, "core", None), "inverse")):
        raise ValueError(f"{type(net).__name__} has no invertible core (input_layer, core.inverse)")
    was_training = net.training
    net.eval()
    try:
        h = net.input_layer(x.float())
        return reconstruction_error(net.core, h, precision=None).max  # non-finite: inf, above every threshold
    finally:
        net.train(was_training)


@torch.no_grad()
def evaluate_seg(
    model: nn.Module,
    loader: Any,
    *,
    roi_size: Sequence[int],
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Whole-volume Dice per foreground class by sliding-window inference.

    Returns:
        ``{"val/dice_<class>": ..., "val/mean_dice": ...}`` (mean over foreground classes; a class
        absent from every ground truth gives ``nan`` and is left out of the mean).
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    # The functional compute_dice, not DiceMetric: DiceMetric.aggregate() all-gathers across ranks
    # whenever a process group exists, which deadlocks a rank-0-only validation under DDP.
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    scores: list[torch.Tensor] = []  # (num_classes - 1,) per volume; nan where the class is absent
    try:
        for batch in loader:
            x = batch["image"].to(device)
            y = batch["label"].to(device)
            with autocast_context(device.type, precision):
                logits = sliding_window_inference(x, tuple(roi_size), sw_batch_size, net, overlap=overlap)
            pred = one_hot(torch.argmax(logits.float(), dim=1, keepdim=True), num_classes)
            dice = compute_dice(pred, one_hot(y.long(), num_classes), include_background=False, ignore_empty=True)
            scores.extend(dice.float().cpu())  # (B, num_classes - 1)
    finally:
        net.train(was_training)
    if not scores:
        raise ValueError("evaluate_seg: the validation loader is empty")
    stacked = torch.stack(scores)  # (volumes, num_classes - 1)
    valid = ~torch.isnan(stacked)
    per_class = (torch.where(valid, stacked, 0.0).sum(0) / valid.sum(0)).tolist()  # nan if absent everywhere
    names = list(class_names)[1:] if class_names and len(class_names) == num_classes else None
    out: dict[str, float] = {}
    for c, value in enumerate(per_class, start=1):
        out[f"val/dice_{names[c - 1] if names else c}"] = float(value)
    finite = [v for v in per_class if math.isfinite(v)]
    out["val/mean_dice"] = float(sum(finite) / len(finite)) if finite else float("nan")
    return out


def load_seg_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SegConfig, nn.Module, dict]:
    """Config and model (eval mode, on ``device``) from a checkpoint written by :func:`train_seg`.

    Returns:
        ``(cfg, model, extra)`` with ``extra`` holding ``num_classes``, ``num_modalities``, ``label_names``.
    """
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "extra" not in state:
        raise ValueError(f"checkpoint {path} holds no segmentation config (not written by train_seg)")
    cfg = from_dict(SegConfig, state["config"], where=f"config in {path}")
    extra = state["extra"]
    model = build_seg_model(cfg.model, int(extra["num_modalities"]), int(extra["num_classes"]))
    model.load_state_dict(state["model"])
    return cfg, model.to(device).eval(), extra


def invert_to_input(pred: torch.Tensor, data: dict[str, Any], transform: Any) -> torch.Tensor:
    """Map ``pred`` (C, *spatial), on the grid of ``data["image"]`` after ``transform``, back to the
    input file's grid (inverting crop, spacing and orientation; nearest-neighbour interpolation)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    image = data["image"]
    pred = MetaTensor(pred, meta=dict(image.meta))  # the affine travels in the meta dict
    inverter = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True, to_tensor=True)
    return inverter({**data, "pred": pred})["pred"]


def _is_nifti_name(name: str) -> bool:
    return name.endswith((".nii", ".nii.gz")) and not name.startswith(".")  # skips macOS ._* files


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand prediction inputs: NIfTI files, folders of them, or an MSD dataset.json (its ``test`` list).

    A folder contributes its ``*.nii`` / ``*.nii.gz`` files in name order, skipping hidden and macOS
    ``._*`` files; a ``.json`` file is read as an MSD dataset.json and contributes its ``test`` list
    (paths relative to its folder, entries as strings or ``{"image": ...}``).

    Raises:
        FileNotFoundError: An input does not exist.
        ValueError: No input, a folder without NIfTI files, a dataset.json without a ``test`` list,
            or two inputs that would write the same output name.
    """
    from invseg.data import load_datalist

    if not inputs:
        raise ValueError("no input given: pass NIfTI files, folders of them, or an MSD dataset.json")
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and _is_nifti_name(p.name))
            if not found:
                raise ValueError(f"input folder {item} holds no .nii / .nii.gz file")
            paths += found
        elif item.suffix == ".json":
            try:
                listed = load_datalist(item, key="test")
            except ValueError as err:
                raise ValueError(f"{err} (a dataset.json given as input is read for its 'test' list)") from None
            paths += [Path(entry["image"]) for entry in listed]
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    names: dict[str, Path] = {}
    for p in paths:
        name = _output_name(p)
        if name in names and names[name] != p:
            raise ValueError(f"inputs {names[name]} and {p} would both be written as {name}; predict them into "
                             "different output folders")
        names[name] = p
    return list(dict.fromkeys(paths))


def _output_name(p: Path) -> str:
    return f"{p.name[:-7] if p.name.endswith('.nii.gz') else p.stem}_seg.nii.gz"


@torch.no_grad()
def predict_volumes(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    device: str = "auto",
    sw_batch_size: int | None = None,
    overlap: float | None = None,
    progress: Any = None,
) -> list[Path]:
    """Segment NIfTI volumes with a trained checkpoint; write ``<name>_seg.nii.gz`` into ``output_dir``.

    ``inputs`` are NIfTI files, folders of them, or an MSD dataset.json whose ``test`` list is
    predicted (:func:`collect_inputs`). Each input goes through the run's validation transforms,
    sliding-window inference (roi = the training patch size), argmax, and the inverse of the
    transforms back to the input grid; the label volume (uint8) is written with the input's affine
    and shape. ``progress`` is called with a line per written volume.

    Raises:
        FileNotFoundError: The checkpoint or an input file is missing.
        ValueError: The checkpoint is not one of :func:`train_seg`; an input is not a readable NIfTI
            volume (:class:`invseg.data.UnreadableImageError`), or has the wrong number of channels.
    """
    from monai.inferers import sliding_window_inference

    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    paths = collect_inputs(inputs)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available on this machine")
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg, model, extra = load_seg_checkpoint(ckpt, dev)
    transform = seg_val_transforms(keys=("image",), **seg_transform_kwargs(cfg.data))
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        try:
            src = nib.load(str(p))
        except Exception as err:  # nibabel raises several types
            raise UnreadableImageError(f"input {p} is not a readable NIfTI image ({type(err).__name__}: {err}); "
                                       "inputs must be .nii or .nii.gz volumes") from err
        channels = 1 if src.ndim == 3 else int(src.shape[3])
        if channels != int(extra["num_modalities"]):
            raise ValueError(f"input {p} has {channels} channel(s), the model was trained on "
                             f"{extra['num_modalities']}")
        with naming_unreadable_files():
            data = transform({"image": str(p)})
        x = data["image"].unsqueeze(0).to(dev)
        with autocast_context(dev.type, cfg.train.precision):
            logits = sliding_window_inference(
                x, tuple(cfg.data.patch_size), sw_batch_size or cfg.train.sw_batch_size, model,
                overlap=cfg.train.sw_overlap if overlap is None else overlap,
            )
        pred = torch.argmax(logits.float(), dim=1, keepdim=True)[0].cpu()  # (1, *spatial)
        label = invert_to_input(pred.float(), data, transform)
        label = np.asarray(label.detach().cpu().numpy()[0]).round().astype(np.uint8)
        if label.shape != tuple(src.shape[:3]):
            raise RuntimeError(f"inverted prediction of {p} has shape {label.shape}, expected {src.shape[:3]}")
        out = out_dir / _output_name(p)
        img = nib.Nifti1Image(label, src.affine)
        img.set_qform(src.affine, code=1)
        img.set_sform(src.affine, code=1)
        nib.save(img, str(out))
        written.append(out)
        if progress is not None:
            counts = np.bincount(label.ravel(), minlength=int(extra["num_classes"]))
            names = list(extra.get("label_names") or range(len(counts)))
            share = ", ".join(f"{n} {c / label.size:.1%}" for n, c in zip(names, counts))
            progress(f"[{len(written)}/{len(paths)}] {p} -> {out} ({'x'.join(map(str, label.shape))}: {share})")
    return written
