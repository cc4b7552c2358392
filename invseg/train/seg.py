"""3D segmentation training, evaluation and prediction (MONAI transforms, NIfTI data, IUNet or UNet).

The engine behind ``scripts/train_seg3d.py`` / ``predict_seg3d.py`` / ``compare_seg3d.py``:

* **Config** -- :class:`SegConfig` (``data``, ``model``, ``train``, ``guard``, ``output``), typed
  dataclasses loaded from YAML with :func:`invseg.config.load_config` (``--set key=value``).
* **Validation before training** (:func:`prepare_seg_data`, :func:`check_patch_size`): every case of
  dataset.json is checked (missing file, image/label shape or affine mismatch, label values outside
  the declared classes, non-finite intensities, empty list), and the patch size must be a multiple
  of what the network needs; each error names the file or key and the rule.
* **Training** (:func:`train_seg`): DiceCE loss, Adam/SGD, cosine/step schedule stepped per
  optimization step, fp32/bf16/fp16 autocast, ``batch_size`` volumes x ``num_samples`` patches per
  step, spectral state updated once per step after ``optimizer.step()`` (DESIGN §1f), validation by
  ``sliding_window_inference`` (roi = patch size) + per-class ``DiceMetric``, best-checkpoint
  selection, tqdm progress, ``metrics.jsonl`` / ``metrics.png`` / ``summary.json`` in the run folder,
  DDP under ``torchrun`` (validation on rank 0). Interrupted runs resume from ``last.pt`` on the same
  trajectory: data sampling depends only on ``(seed, epoch, position)`` (see
  :class:`invseg.train.runner.ResumableSampler`), and the RNG, optimizer, scheduler, scaler and
  spectral states are in the checkpoint.
* **Invertibility guard**: every ``guard.every`` steps the relative reconstruction error
  ``||h - core^-1(core(h))|| / ||h||`` of the IUNet's invertible core on one training patch
  (``h = input_layer(x)``) is logged as ``guard/recon_error``; above ``guard.threshold`` it warns or
  stops (:class:`InvertibilityError`).
* **Prediction** (:func:`predict_volumes`): validation transforms + sliding window, inverted back to
  the input grid with MONAI ``Invertd``, written as ``<name>_seg.nii.gz`` with the input's affine.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from invseg.config import from_dict
from invseg.data import (
    UnreadableImageError,
    ensure_mni152_tissue_decathlon,
    find_unreadable,
    intensity_warnings,
    resampled_shape,
    ensure_synthetic_decathlon,
    make_loader,
    make_seg_datasets,
    prepare_decathlon,
    seg_train_transforms,
    seg_val_transforms,
)
from invseg.layers import SpectralUpdater, spectral_layers
from invseg.train.amp import autocast_context, make_grad_scaler
from invseg.train.checkpoint import load_checkpoint
from invseg.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    init_distributed,
    seed_everything,
    unwrap_model,
)
from invseg.train.runner import ResumableSampler, SeededItems, StepTimer, TrainingRun
from invseg.train.step import train_step

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "GuardConfig",
    "OutputConfig",
    "SegConfig",
    "check_seg_config",
    "InvertibilityError",
    "resolve_dataset_json",
    "prepare_seg_data",
    "build_seg_model",
    "required_multiple",
    "check_patch_size",
    "check_patch_fits",
    "describe_run",
    "time_seg_steps",
    "reconstruction_error",
    "seg_step_spec",
    "evaluate_seg",
    "train_seg",
    "load_seg_checkpoint",
    "predict_volumes",
    "collect_inputs",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the volumes come from and how patches are sampled."""

    dataset_json: str | None = None  # MSD dataset.json; None = the built-in `example` in synthetic_root
    example: Literal["spheres", "mni152_tissue"] = "spheres"  # built-in dataset (spheres; MNI152 T1 tissue)
    synthetic_root: str = "data_cache/synthetic_seg3d"  # the example is written here on first use
    synthetic_num_volumes: int = 10  # labelled cases of the example (train + val)
    synthetic_size: list[int] = field(default_factory=lambda: [48, 48, 48])  # spheres: volume shape
    synthetic_num_classes: int = 2  # spheres: classes incl. background
    synthetic_seed: int = 0  # seed of the example's cases
    val_fraction: float = 0.2  # fraction of cases held out for validation (if num_val is None)
    num_val: int | None = None  # exact number of validation cases
    split_seed: int = 0  # seed of the train/val split
    check_values: bool = True  # read every voxel when validating (finite intensities, label values)
    pixdim: list[float] | None = None  # resample to this voxel size in mm; None keeps the grid
    orientation: str | None = "RAS"  # reorient to these axis codes; None keeps the orientation
    intensity: Literal["normalize", "range"] | None = "normalize"  # z-score (MRI) or CT window
    a_min: float = -175.0  # "range": lower input intensity
    a_max: float = 250.0  # "range": upper input intensity
    crop_foreground: bool = True  # crop to the bounding box of image > 0 first
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32])  # training patch = sliding-window roi
    num_samples: int = 2  # patches per volume and step
    pos: float = 1.0  # weight of foreground-centred patches
    neg: float = 1.0  # weight of background-centred patches
    flip_prob: float = 0.5  # probability of a flip per axis
    cache: bool = True  # keep the deterministic part of the pipeline in memory (CacheDataset)
    num_workers: int = 0  # data-loader worker processes


#: Keys of the flat model section before issue 14; each is now a keyword argument under ``model.kwargs``.
_OLD_MODEL_KEYS = ("channels", "num_blocks", "coupling", "K", "scaling", "sn_method", "sn_mode", "memory_efficient",
                   "hidden_channels", "input_norm", "head_channels", "head_kernel", "stem_channels", "stem_stride",
                   "kernel_size", "activation", "channel_mixing", "strides", "num_res_units")
#: What the trainer passes itself: 3D volumes, channels and classes from dataset.json.
SEG_PROVIDED = ("spatial_dims", "in_channels", "out_channels")


def _default_model_kwargs() -> dict[str, Any]:
    # the stem and head give the IUNet full-resolution capacity (issue 13: +0.11 Dice on the MNI152 example)
    return {"channels": [8, 16, 32], "num_blocks": 1, "stem_channels": 16, "head_channels": 16, "head_kernel": 3}


@dataclass
class ModelConfig:
    """The network: a registered name and its constructor's keyword arguments (``{name, kwargs}``).

    ``name`` is a name of :func:`invseg.nets.list_models` that builds 3D segmentation networks: ``iunet``
    (:class:`invseg.nets.IUNet`) or ``monai_unet`` (MONAI's UNet, :func:`invseg.nets.monai_unet`).
    ``kwargs`` are that constructor's arguments except ``spatial_dims`` (3), ``in_channels`` and
    ``out_channels`` (from dataset.json); they are checked against its signature when the config is
    loaded. A ``kwargs`` given in a file or as ``--set model.kwargs={...}`` replaces the default one;
    ``--set model.kwargs.K=0.5`` changes one argument.
    """

    name: str = "iunet"  # registry name (invseg.nets.list_models())
    kwargs: dict[str, Any] = field(default_factory=_default_model_kwargs)  # constructor keyword arguments

    __config_renamed__ = {key: f"kwargs.{key}" for key in _OLD_MODEL_KEYS}

    def __config_check__(self, where: str, path: str) -> None:
        from invseg.nets import check_model_kwargs

        check_model_kwargs(self.name, self.kwargs, key=f"{path}.kwargs", where=where, provided=SEG_PROVIDED)


@dataclass
class TrainConfig:
    """Optimization, schedule, precision, validation cadence and device."""

    optimizer: Literal["adam", "sgd"] = "adam"  # optimizer
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.0  # L2 weight decay
    momentum: float = 0.9  # sgd momentum
    scheduler: Literal["cosine", "step", "none"] = "cosine"  # per-step learning-rate schedule
    step_size: int = 100  # "step": steps between decays
    gamma: float = 0.5  # "step": decay factor
    max_steps: int = 300  # optimization steps in total
    batch_size: int = 1  # volumes per step and process (x num_samples patches)
    val_every: int = 100  # validate (and checkpoint) every this many steps, and at the end
    checkpoint_every: int = 0  # extra checkpoints every this many steps (0: only at validation)
    checkpoint_minutes: float = 0.0  # also save last.pt when this many minutes passed since the last save (0: off)
    log_every: int = 10  # log the training loss every this many steps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision (fp16: CUDA only)
    grad_clip: float | None = None  # clip the gradient norm to this value
    seed: int = 0  # seed of initialization and patch sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"  # compute device
    sn_check_every: int = 1  # check the power method's stopping rule every n spectral updates
    sn_search_every: int = 1  # DFT searches every n updates, certified bounds in between (1 = every step)
    sw_batch_size: int = 4  # sliding-window inference: windows per forward
    sw_overlap: float = 0.25  # sliding-window overlap
    progress: bool = True  # tqdm progress bar (rank 0)
    threads: int | None = None  # torch.set_num_threads, applied by the scripts (None: torch's default)


@dataclass
class GuardConfig:
    """Reconstruction-error guard of the IUNet's invertible core (issue 5)."""

    every: int = 0  # measure every this many steps (0: off)
    threshold: float = 1e-3  # relative error ||h - core^-1(core(h))|| / ||h|| that triggers
    action: Literal["warn", "stop"] = "warn"  # warn, or stop training


@dataclass
class OutputConfig:
    """Run folder and resume policy."""

    run_dir: str = "outputs/seg3d_synthetic"  # config.yaml, checkpoints, metrics, plot, summary
    resume: str = "auto"  # "auto" (last.pt if present), "never", or a checkpoint path


@dataclass
class SegConfig:
    """Complete 3D segmentation experiment."""

    data: DataConfig = field(default_factory=DataConfig)  # data and patch sampling
    model: ModelConfig = field(default_factory=ModelConfig)  # network
    train: TrainConfig = field(default_factory=TrainConfig)  # optimization
    guard: GuardConfig = field(default_factory=GuardConfig)  # invertibility guard
    output: OutputConfig = field(default_factory=OutputConfig)  # run folder


class InvertibilityError(RuntimeError):
    """The invertible core's reconstruction error exceeded ``guard.threshold`` (``guard.action="stop"``)."""


def check_seg_config(cfg: SegConfig) -> None:
    """Cross-field rules the types cannot express; ValueError naming the key and the rule."""
    d, t, g = cfg.data, cfg.train, cfg.guard
    if len(d.patch_size) != 3 or min(d.patch_size) < 1:
        raise ValueError(f"data.patch_size must be three positive ints, got {d.patch_size}")
    for key, value in (("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.val_every", t.val_every), ("train.log_every", t.log_every),
                       ("train.sn_check_every", t.sn_check_every),
                       ("train.sn_search_every", t.sn_search_every), ("train.sw_batch_size", t.sw_batch_size),
                       ("data.num_samples", d.num_samples), ("train.step_size", t.step_size)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    for key, value in (("train.checkpoint_every", t.checkpoint_every), ("guard.every", g.every),
                       ("data.num_workers", d.num_workers)):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if not t.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {t.lr}")
    if not t.checkpoint_minutes >= 0:
        raise ValueError(f"train.checkpoint_minutes must be >= 0 (0: off), got {t.checkpoint_minutes}")
    if not g.threshold > 0:
        raise ValueError(f"guard.threshold must be > 0, got {g.threshold}")
    if not 0 <= t.sw_overlap < 1:
        raise ValueError(f"train.sw_overlap must be in [0, 1), got {t.sw_overlap}")
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise ValueError(f"train.grad_clip must be > 0 or null, got {t.grad_clip}")
    from invseg.nets import check_model_kwargs

    check_model_kwargs(cfg.model.name, cfg.model.kwargs, provided=SEG_PROVIDED)


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


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


def build_seg_model(model: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    """The network of ``model`` for 3D volumes: ``create_model(model.name, spatial_dims=3, in_channels,
    out_channels, **model.kwargs)`` (:func:`invseg.nets.create_model`)."""
    from invseg.nets import check_model_kwargs, create_model

    check_model_kwargs(model.name, model.kwargs, provided=SEG_PROVIDED)
    return create_model(model.name, spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                        **model.kwargs)


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


def seg_step_spec(cfg: SegConfig, in_channels: int, num_classes: int, device: str = "cpu", steps: int = 3,
                  threads: int | None = None) -> Any:
    """A :class:`invseg.analysis.memory.StepSpec` for one training step of ``cfg``'s network on a batch
    of ``batch_size * num_samples`` patches (fp32 or the configured precision, Adam or SGD, the spectral
    update after the step for IUNet), for :func:`invseg.analysis.memory.measure_step`."""
    from invseg.analysis.memory import StepSpec

    m = cfg.model
    kwargs: dict[str, Any] = dict(name=m.name, spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                                  **m.kwargs)
    sn_method = m.kwargs.get("sn_method", "fft") if m.name == "iunet" else "none"
    post_step = "invseg.layers:update_spectral_state" if sn_method in ("fft", "naive") else None
    batch = cfg.train.batch_size * cfg.data.num_samples
    precision = cfg.train.precision if device == "cuda" or cfg.train.precision != "fp16" else "fp32"
    return StepSpec("invseg.nets:create_model", kwargs, input_shape=(batch, in_channels, *cfg.data.patch_size), target="segmentation",
                    num_classes=num_classes, device=device, precision=precision, optimizer=cfg.train.optimizer,
                    lr=cfg.train.lr, steps=steps, threads=threads, post_step=post_step)


# --------------------------------------------------------------------------------------------
# Guard and evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_error(model: nn.Module, x: torch.Tensor) -> float:
    """Relative reconstruction error ``||h - core.inverse(core(h))|| / ||h||`` with ``h = input_layer(x)``.

    Computed in float32 without autocast (the guard measures the network, not the precision).

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
        rec = net.core.inverse(net.core(h))
        err = (h - rec).norm() / h.norm().clamp_min(torch.finfo(h.dtype).tiny)
    finally:
        net.train(was_training)
    return float(err.item()) if torch.isfinite(err) else float("inf")


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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _transform_kwargs(data: DataConfig) -> dict[str, Any]:
    return dict(pixdim=data.pixdim, orientation=data.orientation, intensity=data.intensity, a_min=data.a_min,
                a_max=data.a_max, crop_foreground=data.crop_foreground)


def _scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.max_steps)
    if train.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.step_size, gamma=train.gamma)
    return None


def _optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay)


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _first_path(value: Any) -> str:
    return str(value[0] if isinstance(value, (list, tuple)) else value)


def _grids(datalist: Sequence[dict], data: DataConfig) -> list[tuple[int, ...]]:
    """Header-only grid of every case after reorientation and resampling (before the foreground crop)."""
    return [resampled_shape(_first_path(item["image"]), data.pixdim, data.orientation) for item in datalist]


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
    sample = [_native_spacing(_first_path(item["image"])) for item in list(train_list)[:8]]
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


@contextmanager
def _naming_unreadable_files():
    """Turn MONAI's ``RuntimeError("applying transform <LoadImaged ...>")`` into the error naming the file."""
    try:
        yield
    except RuntimeError as err:
        bad = find_unreadable(err)
        if bad is None:
            raise
        raise bad from None


def _replan_cosine(scheduler: Any, optimizer: torch.optim.Optimizer, step: int, max_steps: int) -> str | None:
    """Re-plan a resumed cosine schedule over a changed ``max_steps`` from ``step``; return the message."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == max_steps:
        return None
    old, before = scheduler.T_max, optimizer.param_groups[0]["lr"]
    scheduler.T_max = max_steps
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / max_steps)) / 2
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return (f"train.max_steps changed from {old} to {max_steps}: the cosine schedule is re-planned over "
            f"{max_steps} steps from step {step} (learning rate {before:.3g} -> "
            f"{optimizer.param_groups[0]['lr']:.3g}, reaching 0 at step {max_steps})")


def time_seg_steps(cfgs: dict[str, SegConfig], in_channels: int, num_classes: int, rounds: int = 10,
                   steps_per_round: int = 2, device: str = "cpu", seed: int = 0) -> dict[str, list[float]]:
    """Training-step times of several configs' networks, interleaved round by round in one process.

    Each round runs ``steps_per_round`` steps of every network in turn (the trainer's step: DiceCE,
    optimizer, schedule, spectral update) on the same random batch of ``batch_size * num_samples``
    patches, so drifts of a shared machine hit all networks alike. The first round is a warm-up and
    is not returned.

    Returns:
        ``{name: [seconds per step, one per timed round]}``.
    """
    from monai.losses import DiceCELoss

    dev = torch.device(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(seed)
        model = build_seg_model(cfg.model, in_channels, num_classes).to(dev).train()
        optimizer = _optimizer(model, cfg.train)
        batch = cfg.train.batch_size * cfg.data.num_samples
        x = torch.randn(batch, in_channels, *cfg.data.patch_size, generator=g).to(dev)
        y = torch.randint(0, num_classes, (batch, 1, *cfg.data.patch_size), generator=g).to(dev)
        state[name] = (model, optimizer, _scheduler(optimizer, cfg.train), make_grad_scaler(dev.type, cfg.train.precision),
                       SpectralUpdater(model, check_every=cfg.train.sn_check_every,
                                       search_every=cfg.train.sn_search_every), x, y, cfg.train)
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for r in range(rounds + 1):
        for name, (model, opt, sched, scaler, updater, x, y, t_cfg) in state.items():
            timer = StepTimer(dev, skip=0)
            for _ in range(steps_per_round):
                with timer:
                    train_step(model, x, y, loss_fn, opt, precision=t_cfg.precision, scaler=scaler,
                               grad_clip=t_cfg.grad_clip, scheduler=sched, updater=updater)
            if r:
                times[name].append(timer.mean())
    return times


def train_seg(cfg: SegConfig, ctx: DistributedContext | None = None) -> dict[str, Any]:
    """Train a 3D segmentation network as configured; resume if the run folder holds ``last.pt``.

    Everything is validated before the first step (config rules, dataset files, patch size against
    the network and the resampled volumes, the intensity setting against the data). The main rank
    prints a summary of the run, then one line per validation with the Dice of every class by name.
    Under ``torchrun`` pass the context of :func:`invseg.train.init_distributed` (``None`` builds a
    single-process one from ``cfg.train.device``).

    Resuming (``output.resume``): the model settings must equal the checkpoint's (``ValueError``
    naming the keys otherwise, before anything is written); a changed ``train.max_steps`` extends or
    shortens the run and re-plans a cosine schedule from the current step (a message says so); a
    finished run returns its summary.

    Returns:
        The summary (also written to ``run_dir/summary.json`` on rank 0): ``best_step``,
        ``best_mean_dice``, ``best_dice`` (per class), ``final`` (last validation), ``steps``,
        ``wall_time_s``, ``median_step_s``, ``num_params``, ``device``, ``world_size``, ``run_dir``.

    Raises:
        FileNotFoundError, ValueError: Bad data or config (before training); an unreadable image
            (:class:`invseg.data.UnreadableImageError`, a ``ValueError``) also during training.
        NonFiniteLossError: The loss became NaN/inf; ``last.pt`` is the last good checkpoint.
        InvertibilityError: The guard tripped with ``guard.action="stop"``.
    """
    from monai.data import DataLoader, list_data_collate
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    check_seg_config(cfg)
    ctx = ctx if ctx is not None else init_distributed(cfg.train.device)
    device = ctx.device
    t_cfg, d_cfg, g_cfg = cfg.train, cfg.data, cfg.guard
    autocast_context(device.type, t_cfg.precision)  # validates precision against the device
    t_start = time.time()
    seed_everything(t_cfg.seed, ctx.rank)

    def say(message: str) -> None:
        if ctx.is_main:
            print(message, flush=True)

    # ---- validate at the door: data, then the network against the patch size and the volumes
    dataset_json = resolve_dataset_json(d_cfg, ctx)
    train_list, val_list, info = prepare_seg_data(d_cfg, ctx)
    num_classes, in_channels = int(info["num_classes"]), int(info["num_modalities"])
    model = build_seg_model(cfg.model, in_channels, num_classes)
    check_patch_size(model, d_cfg.patch_size)
    if g_cfg.every and not hasattr(model, "core"):
        raise ValueError(f"guard.every = {g_cfg.every} needs an invertible network (model.name='iunet'), "
                         f"got model.name={cfg.model.name!r}; set guard.every=0")
    cases = list(train_list) + list(val_list)
    grids = _grids(cases, d_cfg)
    for message in check_patch_fits(grids, [_first_path(c["image"]) for c in cases], d_cfg,
                                    required_multiple(model)[0]):
        if ctx.is_main:
            warnings.warn(message, UserWarning, stacklevel=2)
    if ctx.is_main:
        for message in intensity_warnings([_first_path(c["image"]) for c in train_list[:2]], d_cfg.intensity,
                                          d_cfg.a_min, d_cfg.a_max):
            warnings.warn(message, UserWarning, stacklevel=2)
    workers = d_cfg.num_workers
    if workers > _available_cpus():
        workers = _available_cpus()
        say(f"data.num_workers = {d_cfg.num_workers} is more than the {workers} CPU(s) this process may use: "
            f"using {workers}")

    # ---- the run folder: a resume must match the checkpoint's model before anything is written
    run = TrainingRun(cfg.output.run_dir, cfg, ctx=ctx, resume=cfg.output.resume, frozen=("model",))
    say(describe_run(cfg, dataset_json, train_list, val_list, info, model, grids))
    model.to(device)

    # ---- data
    patch = tuple(d_cfg.patch_size)
    train_tf = seg_train_transforms(patch_size=patch, num_samples=d_cfg.num_samples, pos=d_cfg.pos,
                                    neg=d_cfg.neg, flip_prob=d_cfg.flip_prob, **_transform_kwargs(d_cfg))
    val_tf = seg_val_transforms(**_transform_kwargs(d_cfg))
    try:
        with _naming_unreadable_files():
            train_ds, val_ds = make_seg_datasets(train_list, val_list if ctx.is_main else [], train_tf, val_tf,
                                                 cache=d_cfg.cache)
    except BaseException:
        run.close()
        raise
    sampler = ResumableSampler(len(train_ds), shuffle=True, seed=t_cfg.seed, num_replicas=ctx.world_size,
                               rank=ctx.rank)
    train_loader = DataLoader(SeededItems(train_ds), batch_size=t_cfg.batch_size, sampler=sampler,
                              num_workers=workers, collate_fn=list_data_collate,
                              persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, batch_size=1, shuffle=False) if ctx.is_main else None

    # ---- optimization state
    optimizer = _optimizer(model, t_cfg)
    scheduler = _scheduler(optimizer, t_cfg)
    scaler = make_grad_scaler(device.type, t_cfg.precision)
    updater = SpectralUpdater(model, check_every=t_cfg.sn_check_every, search_every=t_cfg.sn_search_every)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    resumed = run.resume_into(model, optimizer, scheduler, scaler)
    step, epoch, items_done, best = 0, 0, 0, None
    best_record: dict[str, Any] = {}
    if resumed is not None:
        step, epoch, best = resumed["step"], resumed["epoch"], resumed["best_metric"]
        say(f"resuming from {resumed['path']} at step {step} of {t_cfg.max_steps}")
        changed = [c for c in run.config_changes if c[0] != "train.max_steps"]
        if changed:
            say("  settings changed since the checkpoint: "
                + "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed))
        summary_path = Path(cfg.output.run_dir) / "summary.json"
        if step >= t_cfg.max_steps and summary_path.exists():
            # a finished run: nothing to train, and its summary stays as it was
            say(f"this run already finished ({step} steps); summary in {summary_path}. Extend it with a larger "
                "--set train.max_steps=N (a cosine schedule is re-planned), or start over with "
                "--set output.resume=never")
            run.close()
            return json.loads(summary_path.read_text())
        message = _replan_cosine(scheduler, optimizer, step, t_cfg.max_steps)
        if message:
            say(message)
        extra = resumed["extra"] or {}
        items_done = int(extra.get("items_in_epoch", 0))
        best_record = dict(extra.get("best_record", {}))
        updater.count = step  # same check / no-check pattern of the spectral updates as without a break
    else:
        say(f"run folder: {run.run_dir} (new run)")
    extra_info = {"num_classes": num_classes, "num_modalities": in_channels,
                  "label_names": list(info.get("label_names", []))}

    ddp_model: nn.Module = model
    if ctx.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    timer = StepTimer(device)
    plot_title = f"{cfg.model.name}: {run.run_dir}"
    last_plot = last_save = time.time()
    final: dict[str, float] = {}
    bar = tqdm(total=t_cfg.max_steps, initial=step, disable=not (ctx.is_main and t_cfg.progress),
               desc=f"train {cfg.model.name}", dynamic_ncols=True)

    def report(message: str) -> None:
        if not ctx.is_main:
            return
        if t_cfg.progress:
            bar.write(message)
        else:
            print(message, flush=True)

    def save(is_best: bool) -> None:
        nonlocal last_save
        run.save(model, optimizer, scheduler, scaler, epoch=epoch, step=step, best_metric=best, is_best=is_best,
                 extra={**extra_info, "items_in_epoch": items_done, "best_record": best_record})
        last_save = time.time()

    def save_due() -> bool:
        if not t_cfg.checkpoint_minutes:
            return False
        due = torch.tensor([float(time.time() - last_save >= 60.0 * t_cfg.checkpoint_minutes)], device=device)
        if ctx.distributed:
            dist.all_reduce(due, op=dist.ReduceOp.MAX)  # every rank saves together (RNG states are gathered)
        return bool(due.item())

    try:
        with _naming_unreadable_files():
            ddp_model.train()
            while step < t_cfg.max_steps:
                sampler.set_epoch(epoch)
                if items_done:
                    sampler.set_start(min(items_done, sampler.shard_size))
                for batch in train_loader:
                    x = batch["image"].to(device, non_blocking=True)  # (B * num_samples, C, *patch)
                    y = batch["label"].to(device, non_blocking=True)  # (B * num_samples, 1, *patch)
                    with timer:
                        loss_all = train_step(ddp_model, x, y, loss_fn, optimizer, precision=t_cfg.precision,
                                              scaler=scaler, grad_clip=t_cfg.grad_clip, scheduler=scheduler,
                                              updater=updater, check=lambda v: run.check_finite(v, step + 1),
                                              reduce=all_reduce_mean).loss
                    step += 1
                    items_done += x.shape[0] // d_cfg.num_samples
                    loss_value = float(loss_all.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}",
                                    **({"best_dice": f"{best:.3f}"} if best is not None else {}))
                    values: dict[str, Any] = {}
                    if step % t_cfg.log_every == 0 or step == 1:
                        values.update({"train/loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                       "time/step_s": timer.last})
                    if g_cfg.every and step % g_cfg.every == 0:
                        err = _max_over_ranks(reconstruction_error(model, x[:1]), device)
                        values["guard/recon_error"] = err
                        if not err <= g_cfg.threshold:
                            message = (f"invertibility guard: reconstruction error {err:.3e} of the invertible "
                                       f"core exceeds guard.threshold = {g_cfg.threshold:.1e} at step {step}")
                            if g_cfg.action == "stop":
                                run.log(step, epoch, **values)
                                raise InvertibilityError(
                                    f"{message}; training stopped, the last good checkpoint is kept at "
                                    f"{run.last_checkpoint}"
                                )
                            warnings.warn(message, RuntimeWarning, stacklevel=2)
                    validate = step % t_cfg.val_every == 0 or step == t_cfg.max_steps
                    if validate:
                        is_best = False
                        if ctx.is_main:
                            final = evaluate_seg(model, val_loader, roi_size=patch, num_classes=num_classes,
                                                 device=device, precision=t_cfg.precision,
                                                 sw_batch_size=t_cfg.sw_batch_size, overlap=t_cfg.sw_overlap,
                                                 class_names=extra_info["label_names"])
                            values.update(final)
                            score = final["val/mean_dice"]
                            is_best = math.isfinite(score) and (best is None or score > best)
                            if is_best:
                                best = float(score)
                                best_record = {"step": step, **{k: float(v) for k, v in final.items()}}
                            per_class = ", ".join(f"{k[len('val/dice_'):]} {v:.3f}" for k, v in final.items()
                                                  if k.startswith("val/dice_"))
                            best_text = f"{best:.3f} at step {best_record.get('step')}" if best is not None else "-"
                            report(f"step {step}/{t_cfg.max_steps}: val mean Dice {score:.3f} ({per_class}); "
                                   f"best {best_text}; train loss {loss_value:.4f}")
                        if values:
                            run.log(step, epoch, **values)
                        save(is_best)
                        if time.time() - last_plot > 60.0:  # a plot costs ~1 s: at most once a minute
                            run.plot(title=plot_title, by_step=True)
                            last_plot = time.time()
                    else:
                        if values:
                            run.log(step, epoch, **values)
                        if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or save_due():
                            save(False)
                    if step >= t_cfg.max_steps:
                        break
                else:  # the epoch ran out
                    epoch += 1
                    items_done = 0
    finally:
        bar.close()
        run.close()
        run.plot(title=plot_title, by_step=True)  # also after an error: the curves up to it

    summary = {
        "model": cfg.model.name,
        "steps": step,
        "best_step": best_record.get("step"),
        "best_mean_dice": best,
        "best_dice": {k[len("val/dice_"):]: v for k, v in best_record.items() if k.startswith("val/dice_")},
        "final": final,
        "wall_time_s": time.time() - t_start,
        "median_step_s": timer.median(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "world_size": ctx.world_size,
        "run_dir": str(run.run_dir),
        "resumed_from": resumed["path"] if resumed else None,
    }
    run.write_json("summary.json", summary)
    return summary


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


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
    transform = seg_val_transforms(keys=("image",), **_transform_kwargs(cfg.data))
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
        with _naming_unreadable_files():
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
