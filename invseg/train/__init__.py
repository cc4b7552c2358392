"""invseg.train: training infrastructure and engines.

Checkpoints (atomic save, RNG state for exact resume), the metrics log and its plot,
torchrun/DDP helpers and mixed precision; the run machinery shared by the engines
(:class:`TrainingRun`: run folder, resume, checkpoints, log, non-finite-loss guard).
"""

from invseg.train.amp import PRECISIONS, autocast_context, make_grad_scaler
from invseg.train.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from invseg.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    seed_everything,
    unwrap_model,
)
from invseg.train.metrics import MetricsLogger, plot_metrics, read_metrics
from invseg.train.runner import NonFiniteLossError, ResumableSampler, StepTimer, TrainingRun, check_finite
from invseg.train.seg import (
    InvertibilityError,
    SegConfig,
    build_seg_model,
    check_patch_size,
    evaluate_seg,
    predict_volumes,
    prepare_seg_data,
    reconstruction_error,
    train_seg,
)

__all__ = [
    # checkpoints
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "CheckpointManager",
    # metrics log
    "MetricsLogger",
    "read_metrics",
    "plot_metrics",
    # distributed (torchrun + DDP)
    "DistributedContext",
    "init_distributed",
    "cleanup_distributed",
    "barrier",
    "all_reduce_mean",
    "unwrap_model",
    "seed_everything",
    # mixed precision
    "PRECISIONS",
    "autocast_context",
    "make_grad_scaler",
    # run machinery (run folder, resume, guards)
    "TrainingRun",
    "NonFiniteLossError",
    "check_finite",
    "StepTimer",
    "ResumableSampler",
    # 3D segmentation engine (config sections DataConfig, ModelConfig, ... live in invseg.train.seg)
    "SegConfig",
    "InvertibilityError",
    "prepare_seg_data",
    "build_seg_model",
    "check_patch_size",
    "reconstruction_error",
    "evaluate_seg",
    "train_seg",
    "predict_volumes",
]

# classification (paper §4.2-4.4): ResNet-34-DS on CIFAR-10, MobileNetV2 on ImageNet, the Table 1 grid
from invseg.train.classify import (  # noqa: E402
    ClassifyConfig,
    ClassifyDataConfig,
    ClassifyModelConfig,
    ClassifyOutputConfig,
    ClassifyTrainConfig,
    GridConfig,
    build_classification_data,
    build_classifier,
    check_classify_config,
    collect_grid,
    evaluate_classifier,
    format_grid_table,
    grid_runs,
    train_classifier,
)

__all__ += [
    "ClassifyConfig",
    "ClassifyDataConfig",
    "ClassifyModelConfig",
    "ClassifyTrainConfig",
    "ClassifyOutputConfig",
    "GridConfig",
    "check_classify_config",
    "build_classification_data",
    "build_classifier",
    "evaluate_classifier",
    "train_classifier",
    "grid_runs",
    "collect_grid",
    "format_grid_table",
]
