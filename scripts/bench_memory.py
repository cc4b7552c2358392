#!/usr/bin/env python
"""Peak memory and time of a 3D training step vs network depth: IUNet (recompute) vs plain vs MONAI UNet.

Each point is one training step at batch 1 (SGD, cross-entropy on random labels, the once-per-step
spectral update included) measured in a fresh process: peak RSS of the step on CPU, CUDA peak counters
on GPU (invseg.analysis.measure_step, DESIGN §4). Writes results.json, config.yaml and depth_sweep.png
to out_dir and prints a markdown table. Exit code 5 when some cases failed (they are marked in the table).

    python scripts/bench_memory.py                                   # CPU defaults (32³, depths 5-30)
    python scripts/bench_memory.py --device cuda                     # GPU: sizes 32³, 64³, 128³
    python scripts/bench_memory.py --set sizes=[32,64] --set depths=[5,30]
"""

from __future__ import annotations

import argparse
import json
import sys

from invseg import cli
from invseg.experiments.memory_compare import run_sweep
from invseg.experiments.memory_depth import (
    DepthSweepConfig,
    depth_summary,
    depth_sweep_cases,
    format_depth_table,
    plot_depth_sweep,
)


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="shortcut for --set measure.device=...; cuda uses cuda_sizes")
    return cli.run(_job, parser.parse_args(argv))


def _job(args: argparse.Namespace) -> int:
    if args.device is not None:
        args.overrides = [f"measure.device={args.device}", *args.overrides]
    cfg = cli.load_config(DepthSweepConfig, args)
    run = run_sweep(cfg, depth_sweep_cases(cfg), depth_summary, plot_depth_sweep, "depth_sweep.png")
    records, summary, machine, path = run.records, run.summary, run.machine, run.path
    print(f"# Training-step peak memory vs depth, 3D, batch {cfg.batch_size}, channels {cfg.channels}")
    print(f"# machine: {machine['cpu']}, {machine['logical_cores']} logical cores, {machine['platform']}; "
          f"device {machine['device']} {machine['device_name']}; torch {machine['torch']}; "
          f"worker threads {machine['worker_threads']}")
    print("# peak = measured peak of one step above the memory held before it (CPU: VmHWM - VmRSS in a fresh "
          "process; CUDA: max_allocated - allocated)")
    print(format_depth_table(records))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return cli.ExitCode.OK if all(r.ok for r in records) else cli.ExitCode.INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
