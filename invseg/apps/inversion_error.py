"""Inversion error vs K of IUNet cores: reconstruction error per precision, condition, gradient error.

Sweeps K (and "no spectral normalization") for additive / affine / residual blocks in 2D and 3D, at
initialization, after training steps on a synthetic segmentation batch and with sub-network weights
scaled up; optionally adds a trained checkpoint of invseg-train-seg3d. Writes
``inversion_error.{json,csv,md,png}`` and the resolved ``config.yaml`` into ``output_dir`` and prints
the tables.

Examples:
    invseg-inversion-error                                      # the shipped inversion_vs_K config, CPU, a few minutes
    invseg-inversion-error --set spatial_dims=[2] --set settings=[init]
    invseg-inversion-error --checkpoint outputs/seg3d_synthetic/last.pt
    (in a clone: python scripts/inversion_error.py ... runs the same job)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from invseg import cli


def _job(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` and argument errors answer without loading torch
    import torch

    from invseg.experiments.inversion import InversionSweepConfig, format_sweep_tables, run_inversion_sweep, write_sweep
    from invseg.config import save_config

    cfg = cli.load_config(InversionSweepConfig, args)
    torch.set_num_threads(cfg.threads)  # a shared CPU runs far faster without oversubscription
    checkpoint_model, name = None, "checkpoint"
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise cli.CLIError(f"--checkpoint {path} does not exist", cli.ExitCode.DATA)
        from invseg.train.seg import load_seg_checkpoint

        try:
            _, checkpoint_model, _ = load_seg_checkpoint(path)
        except (ValueError, KeyError) as err:
            raise cli.CLIError(f"cannot load --checkpoint {path}: {err}", cli.ExitCode.DATA) from err
        if not hasattr(checkpoint_model, "core"):
            raise cli.CLIError(f"--checkpoint {path} holds no invertible network (model.name must be 'iunet')",
                               cli.ExitCode.USAGE)
        name = f"checkpoint {path.parent.name}/{path.name}"
    result = run_inversion_sweep(cfg, checkpoint_model, name, progress=not args.no_progress)
    paths = write_sweep(result, cfg.output_dir)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    print(format_sweep_tables(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return cli.ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser, default="inversion_vs_K")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="also measure this checkpoint of invseg-train-seg3d (RUN/last.pt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return cli.run(_job, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
