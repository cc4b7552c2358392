"""invseg.train: training infrastructure and engines.

Checkpoints (atomic save, RNG state for exact resume), the metrics log and its plot,
torchrun/DDP helpers and mixed precision; the run machinery shared by the engines
(:class:`TrainingRun`: run folder, resume, checkpoints, log, non-finite-loss guard).

The names below are imported on first use (``from invseg.train import train_seg`` works as
usual): importing one helper, e.g. ``invseg.train.distributed`` in each rank of a job, does not
load the engines and MONAI with it.
"""

from __future__ import annotations

import importlib

_LAZY = {
    # mixed precision
    "PRECISIONS": "invseg.train.amp",
    "autocast_context": "invseg.train.amp",
    "make_grad_scaler": "invseg.train.amp",
    # the training step (trainers, benchmarks and experiments run this one)
    "StepResult": "invseg.train.step",
    "train_step": "invseg.train.step",
    # checkpoints (atomic save, RNG state for exact resume)
    "CheckpointError": "invseg.train.checkpoint",
    "CheckpointManager": "invseg.train.checkpoint",
    "capture_rng_state": "invseg.train.checkpoint",
    "load_checkpoint": "invseg.train.checkpoint",
    "restore_rng_state": "invseg.train.checkpoint",
    "save_checkpoint": "invseg.train.checkpoint",
    # distributed (torchrun + DDP)
    "DistributedContext": "invseg.train.distributed",
    "all_reduce_mean": "invseg.train.distributed",
    "barrier": "invseg.train.distributed",
    "cleanup_distributed": "invseg.train.distributed",
    "init_distributed": "invseg.train.distributed",
    "seed_everything": "invseg.train.distributed",
    "unwrap_model": "invseg.train.distributed",
    # metrics log
    "MetricsLogger": "invseg.train.metrics",
    "plot_metrics": "invseg.train.metrics",
    "read_metrics": "invseg.train.metrics",
    # run machinery (run folder, resume, guards)
    "NonFiniteLossError": "invseg.train.runner",
    "ResumableSampler": "invseg.train.runner",
    "SeededItems": "invseg.train.runner",
    "StepTimer": "invseg.train.runner",
    "TrainingRun": "invseg.train.runner",
    "check_finite": "invseg.train.runner",
    # 3D segmentation engine (invseg.train.seg gives the names of seg_config, seg_data and seg_eval too)
    "InvertibilityError": "invseg.train.seg",
    "SegConfig": "invseg.train.seg",
    "build_seg_model": "invseg.train.seg",
    "check_patch_size": "invseg.train.seg",
    "evaluate_seg": "invseg.train.seg",
    "predict_volumes": "invseg.train.seg",
    "prepare_seg_data": "invseg.train.seg",
    "guard_error": "invseg.train.seg",
    "train_seg": "invseg.train.seg",
    # classification (paper §4.2-4.4): ResNet-34-DS on CIFAR-10, MobileNetV2 on ImageNet (the Table 1 grid
    # is an experiment driver: invseg.experiments.cifar_grid)
    "ClassifyConfig": "invseg.train.classify",
    "ClassifyDataConfig": "invseg.train.classify",
    "ClassifyModelConfig": "invseg.train.classify",
    "ClassifyOutputConfig": "invseg.train.classify",
    "ClassifyTrainConfig": "invseg.train.classify",
    "build_classification_data": "invseg.train.classify",
    "build_classifier": "invseg.train.classify",
    "check_classify_config": "invseg.train.classify",
    "evaluate_classifier": "invseg.train.classify",
    "train_classifier": "invseg.train.classify",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
