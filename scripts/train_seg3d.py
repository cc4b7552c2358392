"""Train a 3D segmentation network (IUNet or MONAI UNet) on NIfTI data in the MSD layout.

Examples:
    python scripts/train_seg3d.py                                    # synthetic default config
    python scripts/train_seg3d.py --config configs/seg3d_msd_spleen.yaml --set data.dataset_json=/data/Task09_Spleen/dataset.json
    python scripts/train_seg3d.py --set train.max_steps=50 --set output.run_dir=outputs/quick
    torchrun --nproc_per_node 2 scripts/train_seg3d.py --config ...  # DDP

An interrupted run (Ctrl-C, kill) resumes from ``<run_dir>/last.pt`` when started again with the
same command (``--set output.resume=never`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from invseg.config import add_config_arguments, config_from_args
from invseg.data import UnreadableImageError
from invseg.train import cleanup_distributed, init_distributed
from invseg.train.runner import NonFiniteLossError
from invseg.train.seg import InvertibilityError, SegConfig, train_seg

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg3d_synthetic.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_config=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(SegConfig, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)  # a shared CPU runs far faster without oversubscription
    try:
        ctx = init_distributed(cfg.train.device)
    except (RuntimeError, ValueError) as err:  # e.g. train.device=cuda on a machine without CUDA
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train_seg(cfg, ctx)
    except UnreadableImageError as err:  # met before or during training
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error (before training): {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, InvertibilityError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if ctx.is_main:
            print(f"\ninterrupted; run the same command again to resume from {cfg.output.run_dir}/last.pt "
                  f"(if a checkpoint was written)", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
    if ctx.is_main:
        best = summary["best_mean_dice"]
        print(json.dumps(summary, indent=2))
        print(f"best mean foreground Dice {best if best is None else round(best, 4)} at step "
              f"{summary['best_step']}; {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
              f"run folder {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
