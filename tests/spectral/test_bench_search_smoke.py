"""Smoke test of scripts/bench_search.py (one small network, the baseline loaded from git HEAD, JSON written)."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_search.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_search", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_git_head() -> bool:
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "-C", str(SCRIPT.parent), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_git_head(), reason="needs a git checkout (the baseline is read from a revision)")
def test_bench_search_resnet(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert _load_script().main(["--cases", "resnet34ds_32", "--baseline", "HEAD", "--rounds", "1",
                                    "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets its thread count; don't leak it into other tests
    data = json.loads((tmp_path / "bench_search.json").read_text())
    (result,) = data["results"]
    assert set(result["variants"]) == {"before", "after", "after-gate-off"}
    for variant in result["variants"].values():
        assert variant["total_ms"] > 0 and len(variant["groups"]) >= 7  # ResNet-34-DS's depthwise groups
    (exact,) = result["exact_path"]["after"]  # the 4x4 stage through the pruned exact path
    assert 0 < exact["exact_solves"] < exact["channels"]
    assert "before/after" in capsys.readouterr().out
