"""The paper's Table 1 grid (§4.2): ResNet-34-DS on CIFAR-10 for every ``K`` x learning rate x hard/soft scaling.

The driver behind ``scripts/sweep_cifar_grid.py``: :class:`GridConfig` (the sweep, typed and loaded from YAML),
:func:`grid_runs` (one :func:`invseg.train.classify.train_classifier` run per grid point, as config
overrides), :func:`collect_grid` (each run's best test top-1 from its run folder) and
:func:`format_grid_table` (the Table 1 layout, markdown or CSV).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["CIFAR_GRID_LRS", "GridConfig", "grid_runs", "collect_grid", "format_grid_table"]


#: The learning rates of the paper's Table 1 grid.
CIFAR_GRID_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class GridConfig:
    """The Table 1 sweep: every ``K`` x ``lr`` x ``scaling`` combination is one training run."""

    base_config: str = "configs/cifar10_resnet34ds.yaml"  # ClassifyConfig every run starts from
    K: list[float] = field(default_factory=lambda: [float(k) for k in range(1, 11)])  # scaling constants (rows)
    lr: list[float] = field(default_factory=lambda: list(CIFAR_GRID_LRS))  # learning rates (column groups)
    scaling: list[Literal["hard", "soft"]] = field(default_factory=lambda: ["hard", "soft"])  # H / S columns
    out_dir: str = "outputs/cifar10_grid"  # each run in out_dir/K<K>_lr<lr>_<hard|soft>; tables here
    overrides: list[str] = field(default_factory=list)  # extra KEY=VALUE overrides for every run


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _k_label(K: float) -> str:
    return str(int(K)) if float(K).is_integer() else str(K)


def grid_runs(grid: GridConfig) -> list[dict[str, Any]]:
    """One entry per grid point: ``{"K", "lr", "scaling", "run_dir", "overrides"}`` (``--set`` strings).

    The overrides set ``model.kwargs.K``, ``train.lr``, ``model.kwargs.scaling`` and ``output.run_dir``, after the
    grid's own ``overrides``.
    """
    if not grid.K or not grid.lr or not grid.scaling:
        raise ValueError(f"the grid needs at least one K, lr and scaling, got K={grid.K}, lr={grid.lr}, "
                         f"scaling={grid.scaling}")
    for key, values in (("K", grid.K), ("lr", grid.lr)):
        if any(not v > 0 for v in values):
            raise ValueError(f"grid {key} values must be > 0, got {values}")
    runs = []
    for K in grid.K:
        for lr in grid.lr:
            for scaling in grid.scaling:
                run_dir = os.path.join(grid.out_dir, f"K{_k_label(K)}_lr{_lr_label(lr)}_{scaling}")
                runs.append({
                    "K": float(K), "lr": float(lr), "scaling": scaling, "run_dir": run_dir,
                    "overrides": [*grid.overrides, f"model.kwargs.K={float(K)!r}", f"train.lr={float(lr)!r}",
                                  f"model.kwargs.scaling={scaling}", f"output.run_dir={run_dir}"],
                })
    return runs


def _read_result(run_dir: Path) -> tuple[float | None, str]:
    """Best top-1 of a run folder and its status: ``done`` (summary.json), ``partial`` (metrics only),
    ``diverged`` (marker written by the sweep), ``missing``."""
    summary = run_dir / "summary.json"
    status = "diverged" if (run_dir / "DIVERGED").is_file() else None
    if summary.is_file() and status is None:
        try:
            return json.loads(summary.read_text()).get("best_acc1"), "done"
        except (OSError, ValueError):
            pass
    metrics = run_dir / "metrics.jsonl"
    best = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                value = json.loads(line).get("val/acc1")
            except ValueError:
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                best = value if best is None else max(best, value)
    if status is not None:
        return best, status
    return best, "partial" if best is not None else "missing"


def collect_grid(grid: GridConfig) -> list[dict[str, Any]]:
    """Best test top-1 of every grid run folder (``summary.json``, else the best ``val/acc1`` of
    ``metrics.jsonl``): one record per grid point with ``K``, ``lr``, ``scaling``, ``acc1``, ``status``."""
    rows = []
    for r in grid_runs(grid):
        acc, status = _read_result(Path(r["run_dir"]))
        rows.append({"K": r["K"], "lr": r["lr"], "scaling": r["scaling"], "acc1": acc, "status": status,
                     "run_dir": r["run_dir"]})
    return rows


def format_grid_table(rows: list[dict[str, Any]], fmt: Literal["markdown", "csv"] = "markdown") -> str:
    """Table 1 layout: one row per ``K``, columns ``lr`` x (H, S); best test top-1 in percent.

    Cells: the accuracy; ``*`` after it for a run without ``summary.json`` (unfinished), ``†`` for a
    run stopped by a non-finite loss (the paper prints 10.00, chance level, for collapsed runs);
    ``-`` where no result exists.
    """
    ks = sorted({r["K"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    scalings = [s for s in ("hard", "soft") if any(r["scaling"] == s for r in rows)]
    cell = {(r["K"], r["lr"], r["scaling"]): r for r in rows}

    def text(r: dict[str, Any] | None) -> str:
        if r is None or r["acc1"] is None:
            return "†" if r is not None and r["status"] == "diverged" else "-"
        mark = {"done": "", "partial": "*", "diverged": "†"}.get(r["status"], "")
        return f"{r['acc1']:.2f}{mark}"

    cols = [(lr, s) for lr in lrs for s in scalings]
    if fmt == "csv":
        lines = ["K," + ",".join(f"{_lr_label(lr)} {s[0].upper()}" for lr, s in cols)]
        for K in ks:
            lines.append(_k_label(K) + "," + ",".join(text(cell.get((K, lr, s))) for lr, s in cols))
        return "\n".join(lines)
    lines = ["| K | " + " | ".join(f"{_lr_label(lr)} {s[0].upper()}" for lr, s in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for K in ks:
        lines.append(f"| {_k_label(K)} | " + " | ".join(text(cell.get((K, lr, s))) for lr, s in cols) + " |")
    return "\n".join(lines)
