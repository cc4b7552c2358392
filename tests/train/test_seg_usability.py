"""The path from an MSD folder to predictions (issue 13): unreadable files named in every path, the patch
and intensity checks, the run summary and validation lines, resuming with changed settings (model,
max_steps), time-based checkpoints, prediction of folders and test lists, compare_seg3d. Tiny volumes, CPU."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from invseg.config import load_config
from invseg.data import UnreadableImageError, find_unreadable, intensity_warnings, resampled_shape
from invseg.data import write_synthetic_decathlon
from invseg.train import seg as seg_module
from invseg.train.checkpoint import load_checkpoint
from invseg.train.seg import DataConfig, SegConfig, check_patch_fits, collect_inputs, predict_volumes, train_seg

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path, dataset_json=None, run="run", **train):
    """As in test_seg.py: 24^3 synthetic volumes (4 cases, 1 for validation), 16^3 patches, IUNet [4, 8], 2 steps."""
    cfg = load_config(SegConfig, None, overrides=[
        f"data.synthetic_root={tmp_path / 'synthetic'}", "data.synthetic_size=[24,24,24]",
        "data.synthetic_num_volumes=4", "data.num_val=1", "data.patch_size=[16,16,16]", "model.kwargs.channels=[4,8]",
        "model.kwargs.num_blocks=1", "train.max_steps=2", "train.val_every=2", "train.log_every=1",
        "train.progress=false", "train.device=cpu", f"output.run_dir={tmp_path / run}",
    ])
    if dataset_json is not None:
        cfg.data.dataset_json = str(dataset_json)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _nifti(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truncate(path: Path, how: str) -> None:
    """Damage a .nii.gz after an intact header: cut the gzip stream, or store too few voxels."""
    if how == "cut":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])  # gzip ends early: EOFError
    else:
        raw = gzip.open(path).read()
        with gzip.open(path, "wb") as fh:  # a complete gzip stream holding a header and too few voxels
            fh.write(raw[: 352 + 100])


def _dataset(tmp_path, n=4):
    return write_synthetic_decathlon(tmp_path / "msd", num_volumes=n, size=(24, 24, 24))


# ---------------------------------------------------------------- unreadable files: training (both checks) and prediction


@pytest.mark.parametrize(
    "check_values,how,extra",
    [
        (True, "cut", {}),
        (False, "cut", {}),
        (False, "short", {"cache": False}),  # met inside the training loop, not while caching
    ],
)
def test_truncated_file_is_named_in_training(tmp_path, check_values, how, extra):
    dataset_json = _dataset(tmp_path)
    ds = json.loads(Path(dataset_json).read_text())
    bad = Path(dataset_json).parent / ds["training"][-1]["image"]
    _truncate(bad, how)
    cfg = _cfg(tmp_path, dataset_json=dataset_json)
    cfg.data.check_values = check_values
    for key, value in extra.items():
        setattr(cfg.data, key, value)
    with pytest.raises(UnreadableImageError, match=rf"{bad.name}.*complete NIfTI"):
        train_seg(cfg)


def test_truncated_input_is_named_in_prediction(tmp_path):
    train_seg(_cfg(tmp_path))
    image = tmp_path / "synthetic" / "imagesTr" / "synth_000.nii.gz"
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(image.read_bytes())
    _truncate(bad, "cut")
    with pytest.raises(UnreadableImageError, match=r"bad\.nii\.gz.*complete NIfTI"):
        predict_volumes(tmp_path / "run" / "best.pt", [bad], tmp_path / "pred", device="cpu")
    # the script prints the message, no traceback
    assert _script("predict_seg3d").main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--input", str(bad),
                                          "--output", str(tmp_path / "pred")]) == 3  # an unreadable input file: ExitCode.DATA


def test_find_unreadable_digs_through_monai_and_worker_text():
    inner = UnreadableImageError("image file x.nii.gz cannot be read")
    try:
        try:
            raise inner
        except UnreadableImageError as err:
            raise RuntimeError("applying transform <LoadImageChecked>") from err
    except RuntimeError as wrapped:
        assert find_unreadable(wrapped) is inner
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...\n"
                          "invseg.data.decathlon.UnreadableImageError: image file y.nii.gz cannot be read\n")
    assert "y.nii.gz" in str(find_unreadable(worker))
    assert find_unreadable(RuntimeError("something else")) is None


def test_non_checkpoint_file_gets_a_plain_message(tmp_path):
    image = Path(_dataset(tmp_path)).parent / "imagesTr" / "synth_000.nii.gz"
    with pytest.raises(ValueError, match="not a torch checkpoint: it is a gzip file"):
        load_checkpoint(image)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a torch checkpoint: it is a text file") as caught:
        load_checkpoint(text)
    from invseg import cli
    from invseg.train.checkpoint import CheckpointError

    assert isinstance(caught.value, CheckpointError)
    assert cli.exit_code(caught.value) == cli.ExitCode.DATA  # a wrong input file: exit 3, as the README's table


# ---------------------------------------------------------------- patch and intensity checks


def test_patch_larger_than_every_volume_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.data.patch_size = [32, 16, 16]  # the volumes are 24^3
    with pytest.raises(ValueError, match=r"larger than every volume along axis 0.*at most \[24, 24, 24\]"):
        train_seg(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    "grids,patch,expect",
    [
        ([(30, 30, 30), (40, 40, 40)], [16, 16, 16], "fits"),
        ([(30, 30, 30), (12, 40, 40)], [16, 16, 16], "warn"),
        ([(12, 30, 30), (14, 40, 40)], [16, 16, 16], "refuse"),
    ],
)
def test_check_patch_fits(grids, patch, expect):
    data = DataConfig(patch_size=patch, pixdim=[2.0, 2.0, 2.0])
    names = [f"case{i}" for i in range(len(grids))]
    if expect == "refuse":
        with pytest.raises(ValueError, match=r"axis 0 after resampling to data.pixdim=\[2.0, 2.0, 2.0\].*at most \[12, 28, 28\]"):
            check_patch_fits(grids, names, data, multiple=4)
        return
    messages = check_patch_fits(grids, names, data, multiple=4)
    assert (messages == []) == (expect == "fits")
    if expect == "warn":
        assert "1 of 2 volumes" in messages[0] and "case1" in messages[0]


@pytest.mark.parametrize(
    "pixdim,orientation,expect",
    [(None, None, (20, 18, 16)), (None, "RAS", (18, 20, 16)), ((1.0, 1.0, 1.0), "RAS", (36, 30, 40))],
)
def test_resampled_shape_from_the_header(tmp_path, pixdim, orientation, expect):
    affine = np.array([[0, -2.0, 0, 10], [-1.5, 0, 0, 5], [0, 0, 2.5, -3], [0, 0, 0, 1]])  # axes swapped, LPS
    _nifti(tmp_path / "img.nii.gz", np.zeros((20, 18, 16), np.float32), affine)
    assert resampled_shape(tmp_path / "img.nii.gz", pixdim, orientation) == expect


@pytest.mark.parametrize(
    "values,intensity,fragment",
    [
        ((0.0, 900.0), "range", "no negative intensities"),  # MRI with a CT window
        ((-1000.0, 3000.0), "range", "clips"),  # CT whose tissue lies outside the window
        ((-1000.0, 1000.0), "normalize", None),
        ((0.0, 900.0), None, "unscaled"),
        ((0.0, 1.0), None, None),
    ],
)
def test_intensity_warnings(tmp_path, values, intensity, fragment):
    rng = np.random.default_rng(0)
    lo, hi = values
    data = rng.uniform(lo, hi, (16, 16, 16)).astype(np.float32)
    if fragment == "clips":
        data = np.where(data > 0, 2000.0, -1000.0).astype(np.float32)
    _nifti(tmp_path / "img.nii.gz", data, np.eye(4))
    messages = intensity_warnings([tmp_path / "img.nii.gz"], intensity, a_min=-57.0, a_max=164.0)
    if fragment is None:
        assert messages == []
    else:
        assert len(messages) == 1 and fragment in messages[0] and "img.nii.gz" in messages[0]


def test_ct_window_on_mri_warns_in_training(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.data.intensity = "range"
    cfg.data.a_min, cfg.data.a_max = -57.0, 164.0
    cfg.train.max_steps = cfg.train.val_every = 1
    with pytest.warns(UserWarning, match="looks like MRI"):
        train_seg(cfg)


# ---------------------------------------------------------------- console: run summary and validation lines


def test_run_summary_and_validation_lines(tmp_path, capsys):
    train_seg(_cfg(tmp_path))
    out = capsys.readouterr().out
    assert "4 labelled cases -> 3 train, 1 validation" in out
    assert "classes: 0 background, 1 class1" in out
    assert "patches: 16x16x16, 2 per volume" in out and "parameters" in out and "24x24x24" in out
    assert "step 2/2: val mean Dice" in out and "(class1 " in out and "best " in out


# ---------------------------------------------------------------- resume: changed model, extended schedule, time checkpoints


def test_resume_with_a_changed_model_names_the_keys(tmp_path):
    train_seg(_cfg(tmp_path))
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    cfg = _cfg(tmp_path, max_steps=4)
    cfg.model.kwargs.update(channels=[8, 16], num_blocks=2)
    with pytest.raises(ValueError, match=r"model\.kwargs\.channels: \[4, 8\] in the checkpoint, \[8, 16\] now; "
                                         r"model\.kwargs\.num_blocks: 1 in the checkpoint, 2 now.*output\.resume=never"):
        train_seg(cfg)
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml  # not overwritten before the check


def test_extending_a_finished_run_replans_the_cosine(tmp_path, capsys):
    train_seg(_cfg(tmp_path))  # 2 steps, cosine over 2: the learning rate ends at 0
    capsys.readouterr()
    summary = train_seg(_cfg(tmp_path, max_steps=4, val_every=4))
    out = capsys.readouterr().out
    assert summary["steps"] == 4
    assert "train.max_steps changed from 2 to 4: the cosine schedule is re-planned over 4 steps from step 2" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    base = _cfg(tmp_path).train.lr
    for step in (3, 4):  # logged after the step: the schedule's value for the next one
        assert lr[step] == pytest.approx(base * (1 + math.cos(math.pi * step / 4)) / 2, abs=1e-9)
    assert lr[3] > 0  # not restarting from 0, not climbing past the base rate
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_steps"] == 4


def test_checkpoints_by_time(tmp_path, monkeypatch):
    class InterruptAtFourthUpdate(seg_module.SpectralUpdater):
        def __call__(self, *args):
            if self.count == 3:
                raise KeyboardInterrupt
            super().__call__(*args)

    monkeypatch.setattr(seg_module, "SpectralUpdater", InterruptAtFourthUpdate)
    cfg = _cfg(tmp_path, max_steps=6, val_every=6)
    cfg.train.checkpoint_minutes = 1e-9  # every step is "due"
    with pytest.raises(KeyboardInterrupt):
        train_seg(cfg)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3


# ---------------------------------------------------------------- prediction: folders and dataset.json's test list


def test_collect_inputs(tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nii", "._a.nii.gz", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert [p.name for p in collect_inputs([folder])] == ["a.nii", "b.nii.gz"]
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"test": ["./imagesTs/b.nii.gz", "./imagesTs/a.nii"]}))  # MSD: paths
    assert [p.name for p in collect_inputs([ds])] == ["b.nii.gz", "a.nii"]
    ds.write_text(json.dumps({"test": [{"image": "./imagesTs/a.nii"}]}))  # or entries with an image key
    assert collect_inputs([ds]) == [folder / "a.nii"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .nii"):
        collect_inputs([tmp_path / "empty"])
    ds.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="'test'"):
        collect_inputs([ds])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="both be written as b_seg.nii.gz"):
        collect_inputs([folder / "b.nii.gz", tmp_path / "other" / "b.nii.gz"])
    with pytest.raises(FileNotFoundError, match="missing"):
        collect_inputs([tmp_path / "missing.nii.gz"])


def test_predict_a_folder_and_a_test_list(tmp_path, capsys):
    train_seg(_cfg(tmp_path))
    root = tmp_path / "synthetic"
    ds = json.loads((root / "dataset.json").read_text())
    (root / "imagesTs").mkdir()
    for name in ("synth_000.nii.gz", "synth_001.nii.gz"):
        (root / "imagesTs" / name).write_bytes((root / "imagesTr" / name).read_bytes())
    (root / "imagesTs" / "._synth_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource file
    ds["test"] = ["./imagesTs/synth_001.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(ds))
    assert _script("predict_seg3d").main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--input",
                                          str(root / "imagesTs"), "--output", str(tmp_path / "pred")]) == 0
    out = capsys.readouterr().out
    assert "[2/2]" in out and "2 label volume(s) written" in out
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["synth_000_seg.nii.gz", "synth_001_seg.nii.gz"]
    written = predict_volumes(tmp_path / "run" / "best.pt", [root / "dataset.json"], tmp_path / "pred_test",
                              device="cpu")
    assert [p.name for p in written] == ["synth_001_seg.nii.gz"]
    assert nib.load(str(written[0])).shape == (24, 24, 24)


# ---------------------------------------------------------------- compare_seg3d


def test_compare_seg3d_writes_a_table_per_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--set", f"data.synthetic_root={tmp_path / 'synthetic'}", "--set", "data.synthetic_size=[24,24,24]",
            "--set", "data.synthetic_num_volumes=3", "--set", "data.num_val=1", "--set", "data.patch_size=[16,16,16]",
            "--set", "model.kwargs.channels=[4,8]", "--set", "train.progress=false", "--set", "train.device=cpu",
            "--steps", "1", "--out", str(tmp_path / "cmp"), "--no-memory", "--time-rounds", "1",
            "--variants", "iunet_sn", "--variant", "monai_unet: model.kwargs.channels=[4,8]"]
    assert _script("compare_seg3d").main(args) == 0
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert table.startswith("Data: Synthetic") and "Dice class1" in table
    assert "| iunet_sn |" in table and "| monai_unet |" in table and "1.00x" in table
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["iunet_sn", "monai_unet"] and all(r["step_s"] > 0 for r in rows)
    assert _script("compare_seg3d").main(["--variant", "bad name"]) == 2
