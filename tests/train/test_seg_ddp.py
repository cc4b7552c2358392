"""Multi-process training: 2 gloo processes on CPU under torch.distributed.run (torchrun), 2 steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_process_ddp_run(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO / "scripts" / "train_seg3d.py"),
        "--set", f"data.synthetic_root={tmp_path / 'data'}",
        "--set", "data.synthetic_size=[24,24,24]",
        "--set", "data.synthetic_num_volumes=5",
        "--set", "data.num_val=1",
        "--set", "data.patch_size=[16,16,16]",
        "--set", "model.kwargs.channels=[4,8]",
        "--set", "train.max_steps=2",
        "--set", "train.val_every=2",
        "--set", "train.log_every=1",
        "--set", "train.device=cpu",
        "--set", "train.threads=1",
        "--set", "train.progress=false",
        "--set", "guard.every=1",
        "--set", f"output.run_dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["best_mean_dice"] is not None
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])  # unwrapped model saved
    # each rank sampled its own data: the two ranks' RNG streams differ
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes the log
    assert all(r["guard/recon_error"] < 1e-4 for r in records)
