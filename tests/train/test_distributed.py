"""Tests for invseg.train.distributed: single-process fallback and a real 2-process gloo run.

The 2-process run starts its ranks the way torchrun's agent does, but without the agent: the test
hosts the rendezvous store itself (a ``TCPStore`` bound to a free port it keeps open) and gives each
rank torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
plus ``TORCHELASTIC_USE_AGENT_STORE=True``, so every rank is a client of that store. No port is chosen
and released before use (``torchrun --standalone`` does that, racing with other jobs on the machine),
and no agent process or rendezvous round runs: the run is deterministic and starts faster. The
DDP launch through torchrun itself is covered by ``test_seg_ddp.py``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from invseg.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    seed_everything,
    unwrap_model,
)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from invseg.train.distributed import (
        all_reduce_mean, barrier, cleanup_distributed, init_distributed, seed_everything, unwrap_model,
    )

    ctx = init_distributed("cpu")
    seed_everything(0, rank=ctx.rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = torch.nn.Linear(3, 2)
    init = {k: v.tolist() for k, v in model.state_dict().items()}
    ddp = DDP(model)
    g = torch.Generator().manual_seed(123)
    X, Y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    x, y = X[4 * ctx.rank : 4 * ctx.rank + 4], Y[4 * ctx.rank : 4 * ctx.rank + 4]  # this rank's shard
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    value = torch.tensor([float(ctx.rank), 10.0 * ctx.rank])
    mean = all_reduce_mean(value)
    int_mean = all_reduce_mean(torch.tensor([ctx.rank]))
    barrier()
    result = {
        "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
        "is_main": ctx.is_main, "device": str(ctx.device), "distributed": ctx.distributed,
        "mean": mean.tolist(), "input_after": value.tolist(), "int_mean": int_mean.tolist(),
        "unwrapped_is_model": unwrap_model(ddp) is model, "init": init,
        "params": {k: v.tolist() for k, v in unwrap_model(ddp).state_dict().items()},
    }
    with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as fh:
        json.dump(result, fh)
    del ddp  # the reducer goes before its process group
    cleanup_distributed()
    """
)


def _run_ranks(script, args, world_size: int = 2, timeout: float = 120.0) -> list[subprocess.CompletedProcess]:
    """Run ``world_size`` copies of ``script`` as the ranks of one job, as torchrun would (see module doc)."""
    from datetime import timedelta

    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=timeout))
    base = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                TORCHELASTIC_USE_AGENT_STORE="True", WORLD_SIZE=str(world_size))
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world_size)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        del store
    return done


def test_two_process_gloo_ddp(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    for rank, proc in enumerate(_run_ranks(script, [tmp_path])):
        assert proc.returncode == 0, f"rank {rank}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert (r0["local_rank"], r1["local_rank"]) == (0, 1)
    assert r0["is_main"] and not r1["is_main"]
    assert r0["device"] == r1["device"] == "cpu"
    assert r0["distributed"] and r1["distributed"]

    # all_reduce_mean: mean over ranks, input untouched, ints averaged as floats
    assert r0["mean"] == r1["mean"] == [0.5, 5.0]
    assert r1["input_after"] == [1.0, 10.0]
    assert r0["int_mean"] == r1["int_mean"] == [0.5]
    assert r0["unwrapped_is_model"] and r1["unwrapped_is_model"]

    # ranks started from different weights; after DDP + 2 SGD steps they are identical ...
    assert r0["init"] != r1["init"]
    assert r0["params"] == r1["params"]
    # ... and equal single-process SGD on the full batch from rank 0's initial weights
    model = torch.nn.Linear(3, 2)
    model.load_state_dict({k: torch.tensor(v) for k, v in r0["init"].items()})
    g = torch.Generator().manual_seed(123)
    X, Y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(r0["params"][k]), v, rtol=1e-6, atol=1e-6)
    assert r0["params"]["weight"] != r0["init"]["weight"]  # the steps did move the weights


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_context(no_torchrun_env):
    ctx = init_distributed("cpu")
    assert ctx == DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    assert not ctx.distributed
    assert not torch.distributed.is_initialized()
    barrier()  # no-ops without a process group
    cleanup_distributed()
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = all_reduce_mean(x)
    assert torch.equal(y, x.detach()) and y is not x and not y.requires_grad
    auto = init_distributed()
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:0", ""])
def test_bad_device(no_torchrun_env, device):
    with pytest.raises(ValueError, match="device must be one of"):
        init_distributed(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_requested_without_cuda(no_torchrun_env):
    with pytest.raises(ValueError, match="CUDA is not available"):
        init_distributed("cuda")


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, r"RANK must lie in \[0, WORLD_SIZE\)"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ],
)
def test_bad_torchrun_env(no_torchrun_env, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        init_distributed("cpu")
    assert not torch.distributed.is_initialized()


def test_unwrap_model():
    model = torch.nn.Linear(2, 2)
    assert unwrap_model(model) is model
    assert unwrap_model(torch.nn.DataParallel(model)) is model


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything():
    assert seed_everything(5) == 5
    a = _draws()
    seed_everything(5)
    assert _draws() == a
    assert seed_everything(5, rank=1) == 6
    assert _draws() != a


@pytest.mark.parametrize("seed, rank", [(-1, 0), (1.5, 0), (True, 0), (0, -1), (2**32 - 1, 1)])
def test_seed_everything_rejects(seed, rank):
    with pytest.raises(ValueError):
        seed_everything(seed, rank)
