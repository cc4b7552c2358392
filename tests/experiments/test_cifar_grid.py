"""Tests of invseg.experiments.cifar_grid and scripts/sweep_cifar_grid.py: the Table 1 grid's runs (a mini grid
trained on tiny synthetic CIFAR-10 through the script), the collected table and its cell marks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from invseg.config import load_config
from invseg.experiments.cifar_grid import GridConfig, format_grid_table, grid_runs
from invseg.train.checkpoint import load_checkpoint
from invseg.train.classify import ClassifyConfig

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small(tmp_path: Path, data_root: Path, run: str, *extra: str) -> list[str]:
    """Overrides of a seconds-long CPU run: MobileNetV2 x0.35 on synthetic CIFAR, 1 step per epoch."""
    return [
        "data.dataset=synthetic_cifar10", f"data.root={data_root}", "data.synthetic_train_per_class=1",
        "data.synthetic_val_per_class=1", "model.name=mobilenetv2", "model.kwargs.width_mult=0.35", "model.kwargs.K=5.0",
        "train.batch_size=4", "train.max_steps_per_epoch=1", "train.max_eval_steps=1", "train.epochs=1",
        "train.device=cpu", "train.progress=false", "train.log_every=1", "train.milestones=[1]",
        f"output.run_dir={tmp_path / run}", "output.plot=false", *extra,
    ]


def test_sweep_runs_a_mini_grid_and_collects_table1(tmp_path, capsys):
    data = tmp_path / "data"
    base = tmp_path / "base.yaml"
    overrides = _small(tmp_path, data, "unused", "train.max_steps_per_epoch=2")
    cfg = load_config(ClassifyConfig, None, overrides)
    base.write_text(yaml.safe_dump({"data": {"dataset": "synthetic_cifar10", "root": str(data),
                                             "synthetic_train_per_class": 1, "synthetic_val_per_class": 1},
                                    "model": {"name": "mobilenetv2", "kwargs": {"width_mult": 0.35}},
                                    "train": {k: getattr(cfg.train, k) for k in (
                                        "batch_size", "max_steps_per_epoch", "max_eval_steps", "epochs",
                                        "device", "progress")}}))
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base_config": str(base), "K": [1, 2], "lr": [0.01],
                                         "scaling": ["hard", "soft"], "out_dir": str(tmp_path / "grid")}))
    sweep = _script("sweep_cifar_grid")
    assert sweep.main(["--config", str(grid_file), "--dry-run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 4 and all("--set model.kwargs.K=" in c and "train_classifier.py" in c for c in commands)
    assert not (tmp_path / "grid").exists()

    assert sweep.main(["--config", str(grid_file)]) == 0
    table = (tmp_path / "grid" / "table1.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    assert "| K | 1e-2 H | 1e-2 S |" in table
    for line in rows:  # every cell holds a finished run's accuracy (no *, †, -)
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == 2 and all(0.0 <= float(c) <= 100.0 for c in cells), line
    csv = (tmp_path / "grid" / "table1.csv").read_text().splitlines()
    assert csv[0] == "K,1e-2 H,1e-2 S" and len(csv) == 3
    for point in grid_runs(load_config(GridConfig, grid_file)):
        assert (Path(point["run_dir"]) / "summary.json").is_file()
        assert load_checkpoint(Path(point["run_dir"]) / "last.pt")["config"]["model"]["kwargs"]["scaling"] == point["scaling"]

    # collect-only rebuilds the same table without training
    (tmp_path / "grid" / "table1.md").unlink()
    assert sweep.main(["--config", str(grid_file), "--collect-only"]) == 0
    assert (tmp_path / "grid" / "table1.md").read_text() == table


def test_grid_table_marks_partial_diverged_and_missing():
    rows = [
        {"K": 1.0, "lr": 1e-3, "scaling": "hard", "acc1": 50.0, "status": "done"},
        {"K": 1.0, "lr": 1e-3, "scaling": "soft", "acc1": 40.0, "status": "partial"},
        {"K": 2.0, "lr": 1e-3, "scaling": "hard", "acc1": None, "status": "diverged"},
        {"K": 2.0, "lr": 1e-3, "scaling": "soft", "acc1": None, "status": "missing"},
    ]
    table = format_grid_table(rows)
    assert "| 1 | 50.00 | 40.00* |" in table and "| 2 | † | - |" in table
    assert format_grid_table(rows, fmt="csv").splitlines()[1:] == ["1,50.00,40.00*", "2,†,-"]


def test_shipped_grid_is_the_papers_table1():
    grid = load_config(GridConfig, ROOT / "configs" / "cifar10_grid.yaml")
    runs = grid_runs(grid)
    assert len(runs) == 10 * 5 * 2
    assert runs[0]["overrides"][:2] == ["model.kwargs.K=1.0", "train.lr=1e-05"]
    load_config(ClassifyConfig, ROOT / grid.base_config, runs[-1]["overrides"])  # every override is a valid key
