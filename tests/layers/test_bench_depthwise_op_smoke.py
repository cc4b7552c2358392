"""Smoke test of scripts/bench_depthwise_op.py on tiny sizes (JSON written, gradients agree, tables printed)."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_depthwise_op.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_depthwise_op", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_depthwise_op_tiny(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        args = ["--cases", "3:2:6:1:3", "2:2:9:2:5:1:2", "--rounds", "1", "--repeats", "1", "--step",
                "--step-size", "16", "--step-rounds", "1", "--step-steps", "1", "--out", str(tmp_path)]
        assert _load_script().main(args) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("bench_*.json")
    data = json.loads(path.read_text())
    assert [r["spec"] for r in data["ops"]] == ["3:2:6:1:3", "2:2:9:2:5:1:2"]
    assert all(r["max_rel_grad_diff"] < 1e-5 and r["fwdbwd_invseg_s"] > 0 for r in data["ops"])
    (step,) = data["steps"]
    assert step["unet_ratio_to_unet"] == 1.0 and step["iunet-fft-after_s"] > 0
    out = capsys.readouterr().out
    assert "fwd+bwd torch ms" in out and "ratio to UNet" in out


def test_bench_depthwise_op_profile():
    threads = torch.get_num_threads()
    try:
        tables = _load_script().profile_step(16, 1, "none", rows=5, steps=1)
    finally:
        torch.set_num_threads(threads)
    assert set(tables) == {"by_kind", "by_op", "by_op_and_shape"}
    assert "| depthwise conv" in tables["by_kind"] and "| pointwise 1x1x1 conv" in tables["by_kind"]
