"""Tests of invseg.train.runner: run folder, atomic save / resume of the same trajectory, guards."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from invseg.layers import SNDSConv, attach_spectral_update
from invseg.train.runner import NonFiniteLossError, StepTimer, TrainingRun, check_finite


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SNDSConv(2, 2, 4, K=1.0), nn.Dropout(0.3), nn.Conv2d(4, 1, 1))


def _objects(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attach_spectral_update(opt, model)  # spectral state once per step, as a trainer does
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return opt, sched


def _train(run, model, opt, sched, start, stop):
    """Steps that consume the global RNG (random data, dropout): a resume must restore it."""
    for step in range(start, stop):
        x = torch.randn(2, 2, 8, 8)
        loss = model(x).pow(2).mean()
        run.check_finite(loss, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.log(step + 1, epoch=0, **{"train/loss": loss.item()})
        run.save(model, opt, sched, None, epoch=0, step=step + 1, best_metric=-loss.item(), is_best=step == 0)


def test_run_folder_and_checkpoint_contents(tmp_path):
    cfg = {"train": {"lr": 0.01}, "seed": 3}
    model = _model()
    opt, sched = _objects(model)
    run = TrainingRun(tmp_path / "run", cfg)
    assert run.resume_into(model, opt, sched) is None
    _train(run, model, opt, sched, 0, 2)
    assert run.plot(by_step=True) == tmp_path / "run" / "metrics.png"
    run.close()
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == cfg
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["config"] == cfg and isinstance(state["best_metric"], float)
    assert state["scheduler"] is not None and state["rng_per_rank"] and state["world_size"] == 1
    # the spectral state buffers travel with the model state dict
    assert any(k.endswith("sn_v") or "sn_" in k for k in state["model"]), list(state["model"])
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]


def test_resume_continues_the_same_trajectory(tmp_path):
    # uninterrupted: 4 steps
    model_a = _model()
    opt_a, sched_a = _objects(model_a)
    torch.manual_seed(1)
    run_a = TrainingRun(tmp_path / "a", {"x": 1})
    _train(run_a, model_a, opt_a, sched_a, 0, 4)
    run_a.close()

    # interrupted after 2 steps, then a fresh process state resumes
    model_b = _model()
    opt_b, sched_b = _objects(model_b)
    torch.manual_seed(1)
    run_b = TrainingRun(tmp_path / "b", {"x": 1})
    _train(run_b, model_b, opt_b, sched_b, 0, 2)
    run_b.close()
    torch.manual_seed(12345)  # the RNG of the "new process" differs
    model_c = _model()
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(1.0)
    opt_c, sched_c = _objects(model_c)
    run_c = TrainingRun(tmp_path / "b", {"x": 1}, resume="auto")
    info = run_c.resume_into(model_c, opt_c, sched_c)
    assert info["step"] == 2 and info["epoch"] == 0
    _train(run_c, model_c, opt_c, sched_c, 2, 4)
    run_c.close()
    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), name
    assert sched_a.get_last_lr() == sched_c.get_last_lr()
    # the log holds each step once
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("resume", ["never", "explicit"])
def test_resume_modes(tmp_path, resume):
    model = _model()
    opt, sched = _objects(model)
    run = TrainingRun(tmp_path / "r", {})
    _train(run, model, opt, sched, 0, 1)
    run.close()
    arg = "never" if resume == "never" else str(tmp_path / "r" / "last.pt")
    run2 = TrainingRun(tmp_path / "r", {}, resume=arg)
    info = run2.resume_into(_model(), None)
    run2.close()
    assert (info is None) if resume == "never" else info["step"] == 1


def test_resume_from_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        TrainingRun(tmp_path / "r", {}, resume=str(tmp_path / "nope.pt"))


def test_resume_into_wrong_model_names_the_checkpoint(tmp_path):
    model = _model()
    opt, sched = _objects(model)
    run = TrainingRun(tmp_path / "r", {})
    _train(run, model, opt, sched, 0, 1)
    run.close()
    run2 = TrainingRun(tmp_path / "r", {})
    with pytest.raises(ValueError, match="last.pt"):
        run2.resume_into(nn.Linear(2, 2), None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_message(tmp_path, value):
    model = _model()
    opt, sched = _objects(model)
    run = TrainingRun(tmp_path / "r", {})
    _train(run, model, opt, sched, 0, 1)
    before = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"step 7.*kept at .*last\.pt"):
        run.check_finite(torch.tensor(value), 7)
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    run.close()
    with pytest.raises(NonFiniteLossError, match="no checkpoint"):
        check_finite(value, 0, tmp_path / "missing.pt")
    check_finite(torch.tensor(1.0), 0)  # finite: no error


def test_step_timer():
    timer = StepTimer(skip=1)
    assert math.isnan(timer.median())
    for _ in range(3):
        with timer:
            sum(range(1000))
    assert len(timer.times) == 3 and timer.median() >= 0 and timer.last >= 0
    with pytest.raises(ValueError):
        StepTimer(skip=-1)


def test_bad_config_type(tmp_path):
    with pytest.raises(ValueError, match="config"):
        TrainingRun(tmp_path / "r", 3)


@pytest.mark.parametrize("num_items,replicas", [(5, 1), (5, 2), (4, 2), (7, 3)])
def test_resumable_sampler(num_items, replicas):
    from invseg.train.runner import ResumableSampler

    shards = [ResumableSampler(num_items, seed=3, num_replicas=replicas, rank=r) for r in range(replicas)]
    for s in shards:
        s.set_epoch(2)
    items = [list(s) for s in shards]
    covered = {i for shard in items for i, _ in shard}
    assert covered == set(range(num_items)) and all(len(x) == shards[0].shard_size for x in items)
    # same epoch -> same items and seeds; another epoch -> another order/seeds
    again = ResumableSampler(num_items, seed=3, num_replicas=replicas, rank=0)
    again.set_epoch(2)
    assert list(again) == items[0]
    again.set_epoch(3)
    assert list(again) != items[0]
    # mid-epoch resume yields the rest of the shard, once
    again.set_epoch(2)
    again.set_start(1)
    assert len(again) == len(items[0]) - 1 and list(again) == items[0][1:]
    assert list(again) == items[0]
    with pytest.raises(ValueError):
        again.set_start(100)
