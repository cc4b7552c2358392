"""The 3D segmentation config (:class:`SegConfig`: ``data``, ``model``, ``train``, ``guard``, ``output``) and its
cross-field checks, and the network a config describes (:func:`build_seg_model`).

Typed dataclasses loaded from YAML with :func:`invseg.config.load_config` (``--set key=value``); the model
section is ``{name, kwargs}`` checked against the registered constructor's signature
(:func:`invseg.nets.check_model_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "GuardConfig",
    "OutputConfig",
    "SegConfig",
    "SEG_PROVIDED",
    "InvertibilityError",
    "check_seg_config",
    "build_seg_model",
]


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


def build_seg_model(model: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    """The network of ``model`` for 3D volumes: ``create_model(model.name, spatial_dims=3, in_channels,
    out_channels, **model.kwargs)`` (:func:`invseg.nets.create_model`)."""
    from invseg.nets import check_model_kwargs, create_model

    check_model_kwargs(model.name, model.kwargs, provided=SEG_PROVIDED)
    return create_model(model.name, spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                        **model.kwargs)
