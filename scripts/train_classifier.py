"""Train a classifier of the paper's experiments (ResNet-34-DS on CIFAR-10, MobileNetV2 on ImageNet).

Examples:
    python scripts/train_classifier.py --config configs/cifar10_resnet34ds.yaml --set data.root=/data/cifar10
    python scripts/train_classifier.py --config configs/cifar10_resnet34ds.yaml --set model.kwargs.K=3 --set train.lr=1e-3
    torchrun --nproc_per_node 2 scripts/train_classifier.py --config configs/imagenet_mobilenetv2.yaml
    # smoke run without any dataset (tiny synthetic CIFAR-10 written in the real pickle format):
    python scripts/train_classifier.py --config configs/cifar10_resnet34ds.yaml --set data.dataset=synthetic_cifar10 \
        --set data.root=data_cache/synthetic_cifar10 --set train.epochs=1 --set train.batch_size=8 \
        --set output.run_dir=outputs/smoke

``train.batch_size`` is the global batch (each of N torchrun processes loads batch_size / N images).
An interrupted run resumes from ``<run_dir>/last.pt`` when started again with the same command
(``--set output.resume=never`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from invseg.config import add_config_arguments, config_from_args
from invseg.train import cleanup_distributed, init_distributed
from invseg.train.classify import ClassifyConfig, train_classifier
from invseg.train.runner import NonFiniteLossError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(ClassifyConfig, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)  # a shared CPU runs far faster without oversubscription
    try:
        ctx = init_distributed(cfg.train.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train_classifier(cfg, ctx)
    except (FileNotFoundError, ValueError) as err:
        print(f"error (before training): {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if ctx.is_main:
            print(f"\ninterrupted; run the same command again to resume from {cfg.output.run_dir}/last.pt "
                  f"(if a checkpoint was written)", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
    if ctx.is_main:
        print(json.dumps(summary, indent=2))
        best = summary["best_acc1"]
        print(f"best test top-1 {best if best is None else round(best, 2)} % at epoch {summary['best_epoch']}; "
              f"{summary['epochs']} epochs, {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
              f"run folder {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
