"""Train a classifier of the paper's experiments (ResNet-34-DS on CIFAR-10, MobileNetV2 on ImageNet).

Examples:
    invseg-train-classifier --config cifar10_resnet34ds --set data.root=/data/cifar10
    invseg-train-classifier --config cifar10_resnet34ds --set model.kwargs.K=3 --set train.lr=1e-3
    torchrun --nproc_per_node 2 -m invseg.apps.train_classifier --config imagenet_mobilenetv2
    # smoke run without any dataset (tiny synthetic CIFAR-10 written in the real pickle format):
    invseg-train-classifier --config cifar10_resnet34ds --set data.dataset=synthetic_cifar10 \\
        --set data.root=data_cache/synthetic_cifar10 --set train.epochs=1 --set train.batch_size=8 \\
        --set output.run_dir=outputs/smoke
    (in a clone: python scripts/train_classifier.py --config configs/cifar10_resnet34ds.yaml ... runs the same job)

``train.batch_size`` is the global batch (each of N torchrun processes loads batch_size / N images).
An interrupted run resumes from ``<run_dir>/last.pt`` when started again with the same command
(``--set output.resume=never`` starts over). A non-finite loss ends with exit code 4.
"""

from __future__ import annotations

import argparse
import json
import sys

from invseg import cli


def _job(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` and argument errors answer without loading torch
    from invseg.train.classify import ClassifyConfig, train_classifier

    cfg = cli.load_config(ClassifyConfig, args)
    summary = cli.run_training(train_classifier, cfg)
    if summary is not None:
        print(json.dumps(summary, indent=2))
        best = summary["best_acc1"]
        print(f"best test top-1 {best if best is None else round(best, 2)} % at epoch {summary['best_epoch']}; "
              f"{summary['epochs']} epochs, {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
              f"run folder {summary['run_dir']}")
    return cli.ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser)
    return cli.run(_job, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
