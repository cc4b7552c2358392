#!/usr/bin/env python
"""Inversion error vs K of IUNet cores: reconstruction error per precision, condition, gradient error.

Sweeps K (and "no spectral normalization") for additive / affine / residual blocks in 2D and 3D, at
initialization, after training steps on a synthetic segmentation batch and with sub-network weights
scaled up; optionally adds a trained checkpoint of ``scripts/train_seg3d.py``. Writes
``inversion_error.{json,csv,md,png}`` and the resolved ``config.yaml`` into ``output_dir`` and prints
the tables.

Examples:
    python scripts/inversion_error.py                                   # CPU defaults, a few minutes
    python scripts/inversion_error.py --set spatial_dims=[2] --set settings=[init]
    python scripts/inversion_error.py --checkpoint outputs/seg3d_synthetic/last.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from invseg.experiments.inversion import InversionSweepConfig, format_sweep_tables, run_inversion_sweep, write_sweep
from invseg.config import add_config_arguments, config_from_args, save_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "inversion_vs_K.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="also measure this checkpoint of scripts/train_seg3d.py (RUN/last.pt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(InversionSweepConfig, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.threads)  # a shared CPU runs far faster without oversubscription
    checkpoint_model, name = None, "checkpoint"
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if not path.is_file():
            print(f"error: --checkpoint {path} does not exist", file=sys.stderr)
            return 2
        from invseg.train.seg import load_seg_checkpoint

        try:
            _, checkpoint_model, _ = load_seg_checkpoint(path)
        except (ValueError, KeyError) as err:
            print(f"error: cannot load --checkpoint {path}: {err}", file=sys.stderr)
            return 2
        if not hasattr(checkpoint_model, "core"):
            print(f"error: --checkpoint {path} holds no invertible network (model.name must be 'iunet')",
                  file=sys.stderr)
            return 2
        name = f"checkpoint {path.parent.name}/{path.name}"
    try:
        result = run_inversion_sweep(cfg, checkpoint_model, name, progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_sweep(result, cfg.output_dir)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    print(format_sweep_tables(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
