"""Spectral-normalization memory: invseg ("fft") vs the naive power method vs no SN, 3D IUNet and DS stack.

For each network, batch size, volume size and SN method: the persistent SN state (measured on the
model after its first step with invseg.spectral.state_bytes), the measured peak memory of one training
step (peak RSS of the step in a fresh process on CPU, CUDA peak counters on GPU; DESIGN §4) and the
step time. Writes results.json, config.yaml and memory_vs_size.png to out_dir and prints markdown
tables. Exit code 5 when some cases failed (they are marked in the table).

    invseg-memory-compare                                       # the shipped memory_vs_naive config (CPU)
    invseg-memory-compare --device cuda                         # GPU: 32³ ... 128³
    invseg-memory-compare --set sizes=[16] --set models=[ds_stack]
    (in a clone: python scripts/memory_compare.py ... runs the same job)
"""

from __future__ import annotations

import argparse
import sys

from invseg import cli


def _job(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` and argument errors answer without loading torch
    from invseg.experiments.memory_compare import (
        MemoryCompareConfig,
        format_sn_summary,
        format_sn_table,
        plot_sn_memory,
        run_sweep,
        sn_compare_cases,
        sn_summary,
    )

    if args.device is not None:
        args.overrides = [f"measure.device={args.device}", *args.overrides]
    cfg = cli.load_config(MemoryCompareConfig, args)
    run = run_sweep(cfg, sn_compare_cases(cfg), sn_summary, plot_sn_memory, "memory_vs_size.png")
    records, summary, machine, path = run.records, run.summary, run.machine, run.path
    print(f"# SN memory: iunet channels {cfg.iunet.channels} x {cfg.iunet.num_blocks} blocks/level "
          f"(memory_efficient={cfg.iunet.memory_efficient}); ds_stack {cfg.ds_stack.depth} x DS({cfg.ds_stack.channels} ch)")
    print(f"# machine: {machine['cpu']}, {machine['logical_cores']} logical cores, {machine['platform']}; "
          f"device {machine['device']} {machine['device_name']}; torch {machine['torch']}; "
          f"worker threads {machine['worker_threads']}")
    print("# SN state: persistent spectral state after the first step (held between steps). step peak: measured "
          "peak of one step above the memory held before it (CPU: VmHWM - VmRSS in a fresh process; CUDA: "
          "max_allocated - allocated), so it excludes the state. state + step peak: the method's cost beyond "
          "model, optimizer and input.")
    print(format_sn_table(records))
    print()
    print("# At the largest size measured per network and batch:")
    print(format_sn_summary(summary))
    print(f"wrote {path}")
    return cli.ExitCode.OK if all(r.ok for r in records) else cli.ExitCode.INCOMPLETE


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser, default="memory_vs_naive")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="shortcut for --set measure.device=...; cuda uses cuda_sizes")
    return cli.run(_job, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
