#!/usr/bin/env python
"""Spectral-normalization memory: invseg ("fft") vs the naive power method vs no SN, 3D IUNet and DS stack.

For each network, batch size, volume size and SN method: the persistent SN state (measured on the
model after its first step with invseg.spectral.state_bytes), the measured peak memory of one training
step (peak RSS of the step in a fresh process on CPU, CUDA peak counters on GPU; DESIGN §4) and the
step time. Writes results.json, config.yaml and memory_vs_size.png to out_dir and prints markdown
tables.

    python scripts/memory_compare.py                                  # configs/memory_vs_naive.yaml (CPU)
    python scripts/memory_compare.py --device cuda                    # GPU: 32³ ... 128³
    python scripts/memory_compare.py --set sizes=[16] --set models=[ds_stack]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from invseg.experiments.memory_compare import (
    MemoryCompareConfig,
    format_sn_summary,
    format_sn_table,
    machine_info,
    plot_sn_memory,
    run_cases,
    sn_compare_cases,
    sn_summary,
    write_results,
)
from invseg.config import add_config_arguments, config_from_args

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "memory_vs_naive.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="shortcut for --set measure.device=...; cuda uses cuda_sizes")
    args = parser.parse_args(argv)
    if args.device is not None:
        args.overrides = [f"measure.device={args.device}", *args.overrides]
    try:
        cfg = config_from_args(MemoryCompareConfig, args)
        cases = sn_compare_cases(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = run_cases(cases, cfg.measure, progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary = sn_summary(records)
    out = Path(cfg.out_dir)
    path = write_results(out, cfg, records, summary)
    machine = machine_info(records)
    title = f"{machine['device_name'] or machine['cpu']} ({machine['device']}), torch {machine['torch']}"
    if any(r.ok for r in records):
        plot_sn_memory(records, out / "memory_vs_size.png", title=title)
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
    return 0 if all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
