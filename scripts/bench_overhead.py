#!/usr/bin/env python
"""Training-step overhead of spectral normalization: MobileNetV2, ResNet-34-DS and a 3D IUNet.

Times full training steps for the SN variants "none" / "reparam" / "project" / "naive" / "torch" in one
process (methods interleaved round by round), reports the median step time, the ratio to "none" and (on
CUDA) the peak memory, writes JSON and prints a markdown table.

    python scripts/bench_overhead.py                       # CPU defaults, a few minutes on 2 cores
    python scripts/bench_overhead.py --device cuda --precisions fp32 bf16
    python scripts/bench_overhead.py --cases mobilenetv2 resnet34ds --methods none project project@8 reparam torch

"reparam" and "project" are invseg's two sn_modes (DESIGN §1h; "project" is the paper's protocol). "X@N" runs
the DFT searches and the power method's stopping test every N steps (certified bounds in between) and is
timed in whole cycles of N steps, so the searches count at their real share.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from invseg import cli
from invseg.analysis.overhead import (
    default_cases,
    format_overhead_table,
    parse_method,
    run_overhead,
    certificate_slack,
    update_breakdown,
)


def main(argv: list[str] | None = None) -> int:
    p = cli.make_parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--cases", nargs="+", default=["mobilenetv2", "resnet34ds", "iunet3d"],
                   help="any of mobilenetv2, resnet34ds, iunet3d (default: all)")
    p.add_argument("--methods", nargs="+", default=["none", "reparam", "project", "torch"],
                   help="none, reparam, project, naive, torch; X@N searches and checks every N steps (certified "
                        "in between, timed in whole cycles)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], help="fp32, bf16 (fp16 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20 CUDA, 8 CPU)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every case")
    p.add_argument("--size", type=int, default=None, help="override the spatial size of every case")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="SGD learning rate of the timed steps (default 1e-3): how far the weights move per step, "
                        "which the table reports as the regime of the spectral update")
    p.add_argument("--sn-check-every", type=int, default=1,
                   help="test the power method's stopping rule every n steps (1 = paper; >1 avoids host syncs)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the spectral update alone (search / search without check / certify), per mode")
    p.add_argument("--slack", type=int, default=0, metavar="N",
                   help="also measure how much X@N over-normalizes between searches (SGD on random data)")
    p.add_argument("--slack-mode", default="project", choices=["reparam", "project"],
                   help="sn_mode of the --slack run (default project)")
    p.add_argument("--slack-steps", type=int, default=24)
    p.add_argument("--slack-tol", default="0.01",
                   help="slack_tol of the --slack run (default 0.01; 'none': periodic searches only)")
    p.add_argument("--out", default="outputs/bench_overhead")
    args = p.parse_args(argv)
    try:
        slack_tol = None if args.slack_tol.lower() == "none" else float(args.slack_tol)
    except ValueError:
        p.error(f"--slack-tol must be a number or 'none', got {args.slack_tol!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but no CUDA device is available")
    gpu = args.device.startswith("cuda")
    steps = args.steps or (20 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    known = [c.name for c in default_cases(args.device)]
    unknown = [c for c in args.cases if c not in known]
    if unknown:
        p.error(f"unknown --cases {unknown}; known cases: {known}")
    for spec in args.methods:
        try:
            parse_method(spec)
        except ValueError as err:
            p.error(f"--methods: {err}")
    cases = [c for c in default_cases(args.device) if c.name in args.cases]
    for c in cases:
        shape = list(c.input_shape)
        if args.batch:
            shape[0] = args.batch
        if args.size:
            shape[2:] = [args.size] * (len(shape) - 2)
        c.input_shape = tuple(shape)
    return cli.run(lambda args: _job(args, cases, steps, warmup, slack_tol), args)


def _job(args: argparse.Namespace, cases: list, steps: int, warmup: int, slack_tol: float | None) -> int:
    results = run_overhead(cases, args.methods, args.precisions, args.device, steps=steps, warmup=warmup,
                           rounds=args.rounds, lr=args.lr, sn_check_every=args.sn_check_every,
                           progress=lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "device_name": results[0].device_name if results else "",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "steps": steps, "rounds": args.rounds, "sn_check_every": args.sn_check_every, "lr": args.lr}
    breakdown = update_breakdown(cases, args.device) if args.breakdown else []
    # the paper's learning rates: CIFAR ResNet-34-DS 1e-2, ImageNet MobileNetV2 3e-4; the IUNet trainer's 1e-3
    slack_lr = {"resnet34ds": 1e-2, "mobilenetv2": 3e-4, "iunet3d": 1e-3}
    slack = ([certificate_slack(c, args.slack, args.slack_steps, slack_lr.get(c.name, 1e-3), args.device,
                                slack_tol=slack_tol, sn_mode=args.slack_mode) for c in cases] if args.slack else [])
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": [r.to_dict() for r in results],
                                                  "update_breakdown": breakdown, "certificate_slack": slack},
                                                 indent=1))
    print(f"# step-time overhead on {meta['device_name']} (torch {meta['torch']}, {meta['threads']} threads)")
    print(format_overhead_table(results))
    if breakdown:
        print("\n| case | sn_mode | update: search + check | search, no check | certify (between searches) |")
        print("|---|---|---|---|---|")
        for row in breakdown:
            print(f"| {row['case']} | {row['mode']} | {row['search_s'] * 1e3:.1f} ms | "
                  f"{row['search_nocheck_s'] * 1e3:.1f} ms | {row['certify_s'] * 1e3:.1f} ms |")
    if slack:
        print(f"\n| case | sn_mode | SGD lr | certificate / fresh bound − 1 between searches (@{args.slack}): median "
              "| max | layer-steps searched for their slack |")
        print("|---|---|---|---|---|---|")
        for row in slack:
            print(f"| {row['case']} | {row['mode']} | {row['lr']:g} | {row['median'] * 100:.3f} % | "
                  f"{row['max'] * 100:.3f} % | {row['searched'] * 100:.0f} % |")
    print(f"wrote {out / 'results.json'}")
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
