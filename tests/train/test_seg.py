"""Tests of invseg.train.seg: end-to-end run (train, validate, checkpoint, resume, predict), bad inputs,
config loading, the invertibility guard and the non-finite-loss stop. Tiny volumes, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from invseg.config import load_config
from invseg.data import write_synthetic_decathlon
from invseg.nets import create_model
from invseg.train import seg as seg_module
from invseg.train.runner import NonFiniteLossError
from invseg.train.seg import (
    InvertibilityError,
    SegConfig,
    check_patch_size,
    invert_to_input,
    predict_volumes,
    guard_error,
    train_seg,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads make these runs ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path, dataset_json=None, run="run", **train):
    """A tiny config: 24^3 volumes, 16^3 patches, IUNet [4, 8], 2 steps, no progress bar."""
    cfg = load_config(SegConfig, None, overrides=[
        f"data.synthetic_root={tmp_path / 'synthetic'}",
        "data.synthetic_size=[24,24,24]",
        "data.synthetic_num_volumes=4",
        "data.num_val=1",
        "data.patch_size=[16,16,16]",
        "model.kwargs.channels=[4,8]",
        "model.kwargs.num_blocks=1",
        "train.max_steps=2",
        "train.val_every=2",
        "train.log_every=1",
        "train.progress=false",
        "train.device=cpu",
        "guard.every=1",
        f"output.run_dir={tmp_path / run}",
    ])
    if dataset_json is not None:
        cfg.data.dataset_json = str(dataset_json)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_end_to_end_train_resume_predict(tmp_path, monkeypatch):
    # uninterrupted run of 4 steps (validation at 2 and 4)
    full = train_seg(_cfg(tmp_path, run="full", max_steps=4))
    assert full["steps"] == 4 and full["best_mean_dice"] is not None

    # the same command, interrupted (Ctrl-C) in step 3: last.pt holds step 2
    class InterruptAtThirdUpdate(seg_module.SpectralUpdater):
        def __call__(self, *args):
            if self.count == 2:
                raise KeyboardInterrupt
            super().__call__(*args)

    with monkeypatch.context() as patch:
        patch.setattr(seg_module, "SpectralUpdater", InterruptAtThirdUpdate)
        with pytest.raises(KeyboardInterrupt):
            train_seg(_cfg(tmp_path, run="split", max_steps=4))
    run = tmp_path / "split"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.png"):
        assert (run / name).is_file(), name
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    # ... and run again: it resumes from last.pt
    second = train_seg(_cfg(tmp_path, run="split", max_steps=4))
    assert second["resumed_from"] == str(run / "last.pt") and second["steps"] == 4

    # the resumed run continued the same trajectory
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"]
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=1e-5, atol=1e-6), key
    assert any(k.endswith("sn_state") or k.endswith("sn_v") for k in b["model"])  # spectral state saved
    assert b["config"]["train"]["max_steps"] == 4 and b["scheduler"] is not None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["guard/recon_error"] < 1e-4 for r in records)
    assert "val/mean_dice" in records[1] and "train/loss" in records[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["best_dice"]) == {"class1"}

    # prediction: label volume with the input's shape and affine
    image = tmp_path / "synthetic" / "imagesTr" / "synth_000.nii.gz"
    out = predict_volumes(run / "best.pt", [image], tmp_path / "pred", device="cpu")
    assert [p.name for p in out] == ["synth_000_seg.nii.gz"]
    src, seg = nib.load(str(image)), nib.load(str(out[0]))
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1}


def _nifti(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


@pytest.mark.parametrize("pixdim", [None, (1.0, 1.0, 1.0)])
def test_inversion_back_to_the_input_grid(tmp_path, pixdim):
    """A label sent through the validation transforms and inverted lands on its own file's grid."""
    from invseg.data import seg_val_transforms

    rng = np.random.default_rng(0)
    label = np.zeros((20, 18, 16), np.uint8)
    label[4:12, 5:14, 3:9] = 1
    image = (label * 2.0 + rng.uniform(0.1, 0.5, label.shape)).astype(np.float32)
    # LPS-like axes with a permutation and anisotropic spacing: orientation and spacing both change
    affine = np.array([[0, -2.0, 0, 10], [-1.5, 0, 0, 5], [0, 0, 2.5, -3], [0, 0, 0, 1]])
    _nifti(tmp_path / "img.nii.gz", image, affine)
    _nifti(tmp_path / "lab.nii.gz", label, affine)
    tf = seg_val_transforms(keys=("image", "label"), pixdim=pixdim)
    data = tf({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    back = invert_to_input(data["label"].float(), data, tf).numpy()[0].round().astype(np.uint8)
    assert back.shape == label.shape
    if pixdim is None:
        np.testing.assert_array_equal(back, label)
    else:
        assert (back == label).mean() > 0.97


# ---------------------------------------------------------------- bad inputs


def _corrupt(root: Path, kind: str) -> str:
    """Break the dataset at ``root`` in one way; return a fragment the error message must contain."""
    ds = json.loads((root / "dataset.json").read_text())
    label0 = root / ds["training"][0]["label"]
    image0 = root / ds["training"][0]["image"]
    img = nib.load(str(image0))
    if kind == "missing_file":
        image0.unlink()
        return image0.name
    if kind == "shape_mismatch":
        _nifti(label0, np.zeros((20, 24, 24), np.uint8), img.affine)
        return label0.name
    if kind == "affine_mismatch":
        affine = img.affine.copy()
        affine[0, 3] += 5.0
        _nifti(label0, np.asarray(nib.load(str(label0)).dataobj), affine)
        return "affine"
    if kind == "label_out_of_range":
        lab = np.asarray(nib.load(str(label0)).dataobj).copy()
        lab[0, 0, 0] = 7
        _nifti(label0, lab, img.affine)
        return "outside the declared classes"
    if kind == "non_finite":
        data = np.asarray(img.dataobj).astype(np.float32).copy()
        data[1, 2, 3] = np.nan
        _nifti(image0, data, img.affine)
        return "finite"
    if kind == "empty_list":
        ds["training"] = []
        (root / "dataset.json").write_text(json.dumps(ds))
        return "empty"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,error",
    [
        ("missing_file", FileNotFoundError),
        ("shape_mismatch", ValueError),
        ("affine_mismatch", ValueError),
        ("label_out_of_range", ValueError),
        ("non_finite", ValueError),
        ("empty_list", ValueError),
    ],
)
def test_bad_data_stops_before_training(tmp_path, kind, error):
    dataset_json = write_synthetic_decathlon(tmp_path / "msd", num_volumes=3, size=(24, 24, 24))
    fragment = _corrupt(tmp_path / "msd", kind)
    cfg = _cfg(tmp_path, dataset_json=dataset_json)
    with pytest.raises(error, match=fragment):
        train_seg(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    "model,patch,multiple",
    [("iunet", [10, 16, 16], 4), ("iunet", [16, 16, 18], 4), ("monai_unet", [16, 14, 16], 4)],
)
def test_patch_size_the_network_cannot_take(tmp_path, model, patch, multiple):
    cfg = _cfg(tmp_path)
    cfg.model.name = model
    cfg.model.kwargs = {"channels": [4, 8, 16], "num_res_units": 1} if model == "monai_unet" else {"channels": [4, 8, 32]}
    cfg.data.patch_size = patch
    with pytest.raises(ValueError, match=rf"data\.patch_size = \[{patch[0]}, {patch[1]}, {patch[2]}\].*multiple of {multiple}"):
        train_seg(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_check_patch_size_accepts_multiples():
    net = create_model("iunet", spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8, 32])
    check_patch_size(net, [16, 32, 48])
    with pytest.raises(ValueError, match="multiple of 4"):
        check_patch_size(net, [16, 32, 50])


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "key,value,match",
    [("max_steps", 0, "train.max_steps"), ("sw_overlap", 1.0, "train.sw_overlap"), ("lr", -1.0, "train.lr")],
)
def test_config_cross_field_rules(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        train_seg(_cfg(tmp_path, **{key: value}))


def test_fp16_on_cpu_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        train_seg(_cfg(tmp_path, precision="fp16"))


# ---------------------------------------------------------------- guards


def _unstable_iunet():
    """Unnormalized additive IUNet whose sub-network weights are scaled up: inversion breaks down."""
    torch.manual_seed(0)
    net = create_model("iunet", spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], num_blocks=2,
                       sn_method="none")
    with torch.no_grad():
        for name, p in net.core.named_parameters():
            if ".subnet." in name and name.endswith("weight"):
                p.mul_(10.0)
    return net


def test_guard_error_measures_the_core():
    x = torch.randn(1, 1, 16, 16, 16)
    torch.manual_seed(0)
    stable = create_model("iunet", spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], K=1.0)
    assert guard_error(stable, x) < 1e-5
    assert guard_error(_unstable_iunet(), x) > 1e-3
    with pytest.raises(ValueError, match="invertible core"):
        guard_error(torch.nn.Conv3d(1, 2, 1), x)


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_guard_fires_during_training(tmp_path, monkeypatch, action):
    measured = []

    def fake_error(model, x):  # the measurement is tested above; here: the trainer's reaction
        measured.append(tuple(x.shape))
        return 0.5

    monkeypatch.setattr(seg_module, "guard_error", fake_error)
    cfg = _cfg(tmp_path)
    cfg.guard.threshold = 1e-3
    cfg.guard.action = action
    if action == "warn":
        with pytest.warns(RuntimeWarning, match="reconstruction error 5.000e-01") as caught:
            train_seg(cfg)
        assert [str(w.message).endswith(f"at step {s}") for w, s in zip(caught, (1, 2))] == [True, True]
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["guard/recon_error"] for r in records] == [0.5, 0.5]
    else:
        with pytest.raises(InvertibilityError, match="step 1.*last good checkpoint"):
            train_seg(cfg)
        assert not (tmp_path / "run" / "last.pt").exists()
    assert measured[0] == (1, 1, 16, 16, 16)  # one patch


def test_guard_needs_an_invertible_model(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.model.name = "monai_unet"
    cfg.model.kwargs = {"channels": [4, 8], "strides": [2]}
    with pytest.raises(ValueError, match="guard.every"):
        train_seg(cfg)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    build = seg_module.build_seg_model

    class PoisonAtCall(torch.nn.Module):
        """Wraps the model; its 3rd forward (step 3) returns NaN logits."""

        def __init__(self, net):
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * float("nan") if self.calls == 3 else out

    monkeypatch.setattr(seg_module, "build_seg_model", lambda *a, **k: PoisonAtCall(build(*a, **k)))
    cfg = _cfg(tmp_path, max_steps=4, val_every=10, checkpoint_every=1)
    cfg.guard.every = 0
    with pytest.raises(NonFiniteLossError, match=r"step 3.*kept at .*last\.pt"):
        train_seg(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------- scripts (thin: arguments and exit codes)


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_report_bad_input_with_exit_codes_2_and_3(tmp_path, capsys):
    assert _script("train_seg3d").main(["--set", "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert _script("predict_seg3d").main(["--checkpoint", str(tmp_path / "none.pt"), "--input", "x.nii.gz",
                                          "--output", str(tmp_path)]) == 3  # a missing input file: ExitCode.DATA
    assert "none.pt" in capsys.readouterr().err


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    first = train_seg(cfg)
    summary_path = tmp_path / "run" / "summary.json"
    before = summary_path.read_text()
    again = train_seg(_cfg(tmp_path))  # same run folder, resume=auto: nothing left to train
    assert summary_path.read_text() == before
    assert again["final"] == first["final"] and again["steps"] == first["steps"]
    assert "already finished" in capsys.readouterr().out
