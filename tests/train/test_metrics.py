"""Tests for invseg.train.metrics: JSONL logging, resume truncation, reading, plotting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from invseg.train.metrics import MetricsLogger, plot_metrics, read_metrics


def _run(logger: MetricsLogger, steps: range, steps_per_epoch: int = 2) -> None:
    for step in steps:
        epoch = step // steps_per_epoch
        logger.log(step=step, epoch=epoch, **{"train/loss": 1.0 / (step + 1), "train/lr": 0.1})
        if (step + 1) % steps_per_epoch == 0:
            logger.log(step=step, epoch=epoch, **{"val/loss": 2.0 / (step + 1), "val/dice": 0.1 * epoch})


def test_log_writes_one_flushed_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    record = logger.log(step=0, epoch=0, loss=torch.tensor(0.5), acc=np.float32(0.25), n=np.int64(3), note="x")
    # flushed: readable before close
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == record
    assert record["loss"] == 0.5 and record["acc"] == 0.25 and record["n"] == 3 and record["note"] == "x"
    assert set(record) == {"step", "epoch", "time", "loss", "acc", "n", "note"}
    logger.close()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step": 1.5}, "step must be an int"),
        ({"step": True}, "step must be an int"),
        ({"step": 1, "epoch": "1"}, "epoch must be an int"),
        ({"step": 1, "time": 3.0}, "reserved"),
        ({"step": 1, "loss": torch.ones(2)}, "metric 'loss'"),
        ({"step": 1, "loss": [1.0]}, "metric 'loss'"),
    ],
)
def test_log_rejects_bad_values(tmp_path, kwargs, match):
    with MetricsLogger(tmp_path) as logger, pytest.raises(ValueError, match=match):
        logger.log(**kwargs)


def test_resume_drops_entries_after_checkpoint(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run) as logger:
        _run(logger, range(0, 6))  # the run got to step 5 ...
    full = read_metrics(run / "metrics.jsonl")
    assert max(r["step"] for r in full) == 5

    # ... but the last checkpoint was at step 3: resume from it and replay steps 4, 5
    with MetricsLogger(run, resume_from_step=3) as logger:
        assert [r["step"] for r in logger.read()] == [r["step"] for r in full if r["step"] <= 3]
        _run(logger, range(4, 6))
    resumed = read_metrics(run / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(full)  # same trajectory, no duplicates


def test_fresh_logger_replaces_old_log(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        _run(logger, range(4))
    with MetricsLogger(tmp_path) as logger:
        logger.log(step=0, loss=1.0)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_resume_without_existing_file(tmp_path):
    with MetricsLogger(tmp_path, filename="m.jsonl", resume_from_step=10) as logger:
        logger.log(step=11, loss=1.0)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [11]


def test_partial_last_line_is_tolerated_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "epoch": 0, "loss": 1.0}\n{"step": 1, "epo')  # crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [0]
    with MetricsLogger(tmp_path, resume_from_step=5) as logger:
        logger.log(step=1, loss=0.5)
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_metrics(tmp_path / "nothing.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        read_metrics(path)


def test_plot_from_file(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        _run(logger, range(8))
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "metrics.png", title="run")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in png.parent.iterdir()) == ["metrics.png"]  # no temp file left


def test_plot_groups_axes_and_log_scale(tmp_path, monkeypatch):
    # Inspect the figure that plot_metrics builds by capturing it before it is saved.
    from matplotlib.figure import Figure

    captured = []
    real_savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        captured.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    records = []
    for step in range(10):
        records.append({"step": step, "epoch": step // 5, "train/loss": 10.0 ** (-step / 2), "lr": 0.1})
    for epoch in range(2):
        records.append({"step": 5 * epoch + 4, "epoch": epoch, "val/dice": 0.5 + 0.1 * epoch, "val/loss": 1.0})
    plot_metrics(records, tmp_path / "p.png")
    axes = {ax.get_title(): ax for ax in captured[0].axes}
    # losses per step, losses per epoch, learning rate, validation metrics
    assert set(axes) == {"loss", "learning rate", "val"}
    titles_axis = sorted((ax.get_title(), ax.get_xlabel()) for ax in captured[0].axes)
    assert titles_axis == [("learning rate", "step"), ("loss", "epoch"), ("loss", "step"), ("val", "epoch")]
    step_loss = next(ax for ax in captured[0].axes if ax.get_title() == "loss" and ax.get_xlabel() == "step")
    assert step_loss.get_yscale() == "log"  # 1 .. 1e-4.5: more than two decades
    assert axes["val"].get_yscale() == "linear"


def test_plot_keys_selection_and_errors(tmp_path):
    records = [{"step": i, "epoch": None, "loss": 1.0 + i, "name": "x"} for i in range(3)]
    assert plot_metrics(records, tmp_path / "a.png", keys=["loss"]).stat().st_size > 0
    with pytest.raises(ValueError, match=r"\['acc'\].*available: loss"):
        plot_metrics(records, tmp_path / "b.png", keys=["acc"])
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_metrics([{"step": 0, "epoch": 0}], tmp_path / "c.png")
    with pytest.raises(FileNotFoundError):
        plot_metrics(tmp_path / "missing.jsonl", tmp_path / "d.png")
