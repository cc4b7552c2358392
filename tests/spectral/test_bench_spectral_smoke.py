"""Smoke test of scripts/bench_spectral.py --quick (JSON and PNG written, bounds valid)."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_spectral.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_spectral", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_spectral_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert _load_script().main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets 1 thread by default; don't leak it into other tests
    data = json.loads((tmp_path / "bench_spectral.json").read_text())
    png = tmp_path / "bound_accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["reference"] for r in data["accuracy"]} == {"dense", "lanczos"}
    for r in data["accuracy"]:
        assert min(r["min_ratio"].values()) >= 1 - 1e-9  # both bounds are upper bounds
        assert r["median"]["invseg"] <= r["median"]["paper"] + 1e-12
    assert data["cost"] and all(c["chunked_peak_bytes"] >= 0 for c in data["cost"])
    assert "median" in capsys.readouterr().out
