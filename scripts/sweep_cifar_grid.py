"""The paper's Table 1 grid: ResNet-34-DS on CIFAR-10 for every K x learning rate x hard/soft scaling.

Examples:
    python scripts/sweep_cifar_grid.py --config configs/cifar10_grid.yaml --dry-run        # print the commands
    python scripts/sweep_cifar_grid.py --config configs/cifar10_grid.yaml                  # run them in turn
    python scripts/sweep_cifar_grid.py --config configs/cifar10_grid.yaml --launcher "torchrun --nproc_per_node 2"
    python scripts/sweep_cifar_grid.py --config configs/cifar10_grid.yaml --collect-only   # just the table
    python scripts/sweep_cifar_grid.py --config configs/cifar10_grid.yaml --set K=[5] --set lr=[0.01]

Each run trains in ``<out_dir>/K<K>_lr<lr>_<scaling>`` (a finished run is skipped, an interrupted one
resumes from its ``last.pt``); a run stopped by a non-finite loss (with ``--launcher``: exit code 4) is
marked ``DIVERGED`` and the sweep goes on. At the end, each run's best test top-1 accuracy is collected
into ``<out_dir>/table1.md`` and ``table1.csv``, laid out like the paper's Table 1 (rows K, columns lr x H/S).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from invseg import cli
from invseg.config import load_config
from invseg.experiments.cifar_grid import GridConfig, collect_grid, format_grid_table, grid_runs
from invseg.train.classify import ClassifyConfig, train_classifier
from invseg.train.runner import NonFiniteLossError

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_classifier.py"


def _command(base_config: str, overrides: list[str], launcher: str | None) -> list[str]:
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    cmd = [*prefix, str(TRAIN_SCRIPT), "--config", base_config]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _job(args: argparse.Namespace) -> int:
    grid = cli.load_config(GridConfig, args)
    try:
        base_config = str(cli.resolve_config(grid.base_config))  # a path, or a shipped config's name
    except cli.CLIError as err:
        raise cli.CLIError(f"base_config of the grid: {err}") from None
    runs = grid_runs(grid)
    # validate every run's config before the first one starts (a typo must not surface at run 57)
    configs = [load_config(ClassifyConfig, base_config, r["overrides"]) for r in runs]

    if args.dry_run:
        for r in runs:
            print(shlex.join(_command(base_config, r["overrides"], args.launcher)))
        return cli.ExitCode.OK
    if not args.collect_only:
        for i, (r, cfg) in enumerate(zip(runs, configs), start=1):
            run_dir = Path(r["run_dir"])
            if (run_dir / "summary.json").is_file() or (run_dir / "DIVERGED").is_file():
                print(f"[{i}/{len(runs)}] {run_dir}: done before, skipped", flush=True)
                continue
            print(f"[{i}/{len(runs)}] K={r['K']:g} lr={r['lr']:g} {r['scaling']} -> {run_dir}", flush=True)
            if args.launcher:
                rc = subprocess.call(_command(base_config, r["overrides"], args.launcher))
                if rc == cli.ExitCode.DIVERGED:  # train_classifier.py: non-finite loss
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "DIVERGED").write_text("non-finite training loss\n")
                elif rc != 0:
                    print(f"error: run {run_dir} failed with exit code {rc}", file=sys.stderr)
                    return rc
                continue
            try:
                train_classifier(cfg)
            except NonFiniteLossError as err:  # the sweep goes on; the table marks the run
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "DIVERGED").write_text(f"{err}\n")
                print(f"  diverged: {err}", file=sys.stderr)

    rows = collect_grid(grid)
    out = Path(grid.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_grid_table(rows)
    (out / "table1.md").write_text(
        "Best test top-1 accuracy (%) per K (rows) and learning rate x scaling (H hard, S soft).\n"
        "* unfinished run (best so far), † stopped by a non-finite loss, - no result.\n\n" + table + "\n")
    (out / "table1.csv").write_text(format_grid_table(rows, fmt="csv") + "\n")
    print(table)
    print(f"wrote {out / 'table1.md'} and {out / 'table1.csv'}")
    return cli.ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the training commands, run nothing")
    mode.add_argument("--collect-only", action="store_true", help="only build the table from existing runs")
    parser.add_argument("--launcher", default=None,
                        help='run each training as a subprocess with this prefix, e.g. "torchrun --nproc_per_node 2" '
                             "(default: in this process, one after another)")
    return cli.run(_job, parser.parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())
