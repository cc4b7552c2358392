"""Tests for invseg.train.checkpoint: atomic saves, loading errors, RNG round-trip, manager."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from invseg.train import checkpoint as ckpt_mod
from invseg.train.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 3,
        "epoch": 1,
        "config": {"train": {"lr": 0.1, "milestones": [1, 2]}},
        "rng": capture_rng_state(),
    }


def test_save_load_round_trip_safe_loader(tmp_path):
    state = _state(0.5)
    path = save_checkpoint(state, tmp_path / "a" / "b.pt")
    assert path.is_file()
    loaded = load_checkpoint(path)  # weights_only=True: RNG state is stored without numpy arrays
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)
    assert loaded["config"] == state["config"]
    assert loaded["step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.pt"]


class _FailingFile:
    """File wrapper whose writes fail after ``limit`` bytes, like a disk filling up mid-save."""

    def __init__(self, f, limit: int) -> None:
        self.f, self.left = f, limit

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.left:
            self.f.write(data[: self.left])
            self.left = 0
            raise OSError("disk full")
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_failed_save_keeps_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"tag": "old", "w": torch.ones(64, 64)}, path)
    before = path.read_bytes()

    real_save = torch.save
    written = []

    def failing_save(obj, f, *args, **kwargs):
        written.append(f)
        return real_save(obj, _FailingFile(f, limit=2000), *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    # torch's zip writer may turn the OSError into a RuntimeError while closing the archive
    with pytest.raises((OSError, RuntimeError)):
        save_checkpoint({"tag": "new", "w": torch.zeros(64, 64)}, path)
    monkeypatch.undo()

    assert written and written[0].name != str(path)  # torch.save wrote to a temp file, not `path`
    assert path.read_bytes() == before
    assert load_checkpoint(path)["tag"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_interrupt_during_save_cleans_up(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"a": 1}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(path)


def test_load_truncated_checkpoint(tmp_path):
    path = save_checkpoint(_state(1.0), tmp_path / "t.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t.pt"):
        load_checkpoint(path)


def test_load_non_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="must contain a dict"):
        load_checkpoint(path)


def test_unsafe_objects_need_explicit_opt_in(tmp_path):
    path = save_checkpoint({"best": np.float64(0.5)}, tmp_path / "np.pt")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["best"] == 0.5


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),  # leaves a cached gaussian in numpy's legacy state
        torch.rand(3).tolist(),
    )


@pytest.mark.parametrize("through_file", [False, True])
def test_rng_round_trip(tmp_path, through_file):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = capture_rng_state()
    first = _draw()
    if through_file:
        path = save_checkpoint({"rng": state}, tmp_path / "rng.pt")
        state = load_checkpoint(path)["rng"]
    _draw()  # advance every generator further
    restore_rng_state(state)
    assert _draw() == first


def test_restore_rejects_unknown_entries():
    with pytest.raises(ValueError, match="unknown entries"):
        restore_rng_state({"python": random.getstate(), "jax": 1})


@pytest.mark.parametrize("keep_last", [True, False])
def test_manager(tmp_path, keep_last):
    manager = CheckpointManager(tmp_path / "run", keep_last=keep_last)
    assert manager.latest() is None
    assert manager.load_latest() is None

    manager.save({"epoch": 1, "value": 1}, is_best=True)
    manager.save({"epoch": 2, "value": 2})
    assert manager.latest() == tmp_path / "run" / "last.pt"
    assert manager.load_latest()["value"] == 2
    assert load_checkpoint(manager.best_path)["value"] == 1

    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    expected = ["best.pt", "last.pt"]
    if not keep_last:
        expected = ["best.pt", "ckpt_000001.pt", "ckpt_000002.pt", "last.pt"]
    assert names == expected

    if not keep_last:  # without last.pt the highest-numbered history file is the latest
        manager.last_path.unlink()
        assert manager.latest().name == "ckpt_000002.pt"
        assert manager.load_latest()["value"] == 2


def test_manager_rejects_non_bool_keep_last(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=3)


def test_checkpoint_file_mode_follows_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = save_checkpoint({"a": 1}, tmp_path / "m.pt")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0o600
