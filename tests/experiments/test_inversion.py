"""Tests of invseg.experiments.inversion: the inversion-error-vs-K sweep and its script (the checkers it calls
are tested in tests/blocks/test_inversion.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from invseg.experiments.inversion import synthetic_segmentation_batch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "inversion_error.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # a shared 2-core machine runs these tiny models far faster on one thread
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_synthetic_batch():
    img, lab = synthetic_segmentation_batch(3, 8, batch_size=2, in_channels=2, seed=3)
    assert img.shape == (2, 2, 8, 8, 8) and lab.shape == (2, 1, 8, 8, 8) and lab.dtype == torch.int64
    assert 0 < lab.float().mean() < 1
    img2, _ = synthetic_segmentation_batch(3, 8, batch_size=2, in_channels=2, seed=3)
    assert torch.equal(img, img2)


# --- the sweep script ------------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("inversion_error_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_script_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--no-progress",
        "--set", f"output_dir={out}",
        "--set", "spatial_dims=[2]",
        "--set", "Ks=[0.5,4.0]",
        "--set", "couplings=[additive,residual]",
        "--set", "net2d={channels: [4, 8], num_blocks: 1, size: 8}",
        "--set", "precisions=[fp64,fp32,fp16]",
        "--set", "train_steps=2",
        "--set", "power_iterations=2",
        "--set", "adversarial_factor=8.0",
    ]
    assert _script().main(argv) == 0
    for name in ("inversion_error.json", "inversion_error.csv", "inversion_error.md", "inversion_error.png",
                 "config.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "inversion_error.json").read_text())
    rows = data["rows"]
    # additive: K 0.5, 4, none; residual: K 0.5 -> 4 networks x 3 settings x 2 precisions (fp16 skipped on CPU)
    assert len(rows) == 4 * 3 * 2
    assert any("fp16" in s for s in data["skipped"])
    assert {r["setting"] for r in rows} == {"init", "trained", "adversarial"}
    adv = {(r["coupling"], r["K"]): r for r in rows if r["setting"] == "adversarial" and r["precision"] == "fp32"}
    err_none = adv[("additive", None)]["max_rel_err"]
    assert err_none == "inf" or err_none > 100 * adv[("additive", 4.0)]["max_rel_err"]
    # per-block growth: level (coupling, mixing), split, down, bottom level (2), up, merge, level (2)
    assert all(len(r["per_block"]) == 10 for r in rows if r["precision"] == "fp32" and r["K"] is not None)
    printed = capsys.readouterr().out
    assert "Max relative reconstruction error" in printed and "| none |" in printed


def test_sweep_script_rejects_missing_checkpoint_and_bad_config(tmp_path, capsys):
    mod = _script()
    assert mod.main(["--checkpoint", str(tmp_path / "nope.pt"), "--set", f"output_dir={tmp_path}"]) == 3  # ExitCode.DATA
    assert "does not exist" in capsys.readouterr().err
    assert mod.main(["--set", "couplings=[bogus]", "--set", f"output_dir={tmp_path}"]) == 2
    assert "couplings" in capsys.readouterr().err


def test_sweep_script_measures_a_checkpoint(tmp_path):
    from invseg.config import to_dict
    from invseg.train.checkpoint import save_checkpoint
    from invseg.train.seg import SegConfig, build_seg_model

    cfg = SegConfig()
    cfg.model.kwargs.update(channels=[2, 8], num_blocks=1, K=2.0)
    torch.manual_seed(0)
    model = build_seg_model(cfg.model, 1, 2)
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 8, 8))  # a trained model has run: its spectral state is set
    path = save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg),
                            "extra": {"num_classes": 2, "num_modalities": 1, "label_names": {}}},
                           tmp_path / "run" / "last.pt")
    out = tmp_path / "out"
    argv = ["--no-progress", "--checkpoint", str(path), "--set", f"output_dir={out}",
            "--set", "spatial_dims=[3]", "--set", "Ks=[2.0]", "--set", "couplings=[additive]",
            "--set", "no_sn=false", "--set", "settings=[init]",
            "--set", "net3d={channels: [2, 8], num_blocks: 1, size: 8}",
            "--set", "precisions=[fp32]", "--set", "power_iterations=2"]
    assert _script().main(argv) == 0
    rows = json.loads((out / "inversion_error.json").read_text())["rows"]
    ckpt = [r for r in rows if r["setting"].startswith("checkpoint")]
    assert len(ckpt) == 1 and ckpt[0]["K"] == 2.0 and ckpt[0]["sn"] == "fft" and ckpt[0]["dims"] == 3
    assert 0 < ckpt[0]["max_rel_err"] < 1e-5
    # the checkpoint was built from the same seed and arguments as the sweep's network: errors of one order
    init = [r for r in rows if r["setting"] == "init"][0]
    assert ckpt[0]["max_rel_err"] == pytest.approx(init["max_rel_err"], rel=0.5)
