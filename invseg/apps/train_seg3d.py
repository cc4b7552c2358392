"""Train a 3D segmentation network (IUNet or MONAI UNet) on NIfTI data in the MSD layout.

Examples:
    invseg-train-seg3d                                          # the shipped synthetic config
    invseg-train-seg3d --config seg3d_msd_cpu --set data.dataset_json=/data/Task09_Spleen/dataset.json
    invseg-train-seg3d --set train.max_steps=50 --set output.run_dir=outputs/quick
    torchrun --nproc_per_node 2 -m invseg.apps.train_seg3d --config ...   # DDP
    (in a clone: python scripts/train_seg3d.py ... runs the same job)

An interrupted run (Ctrl-C, kill) resumes from ``<run_dir>/last.pt`` when started again with the
same command (``--set output.resume=never`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys

from invseg import cli


def _job(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` and argument errors answer without loading torch and MONAI
    from invseg.train import SegConfig, train_seg

    cfg = cli.load_config(SegConfig, args)
    summary = cli.run_training(train_seg, cfg)
    if summary is not None:
        best = summary["best_mean_dice"]
        print(json.dumps(summary, indent=2))
        print(f"best mean foreground Dice {best if best is None else round(best, 4)} at step "
              f"{summary['best_step']}; {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
              f"run folder {summary['run_dir']}")
    return cli.ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser, default="seg3d_synthetic")
    return cli.run(_job, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
