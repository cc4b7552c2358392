"""Tests of invseg.data.mni152: the real-MRI example written as an MSD folder.

The generator runs on a small stand-in template (a "brain" of a white-matter core in a grey-matter
shell, written as NIfTI in the layout of nilearn's files); the real nilearn files are used when
nilearn is installed (``pip install -e ".[examples]"``), on a 4x downsampled copy."""

from __future__ import annotations

import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest

from invseg.data import (
    MNI152_LABELS,
    ensure_mni152_tissue_decathlon,
    mni152_template_files,
    prepare_decathlon,
    validate_datalist,
    write_mni152_tissue_decathlon,
)
from invseg.data import mni152 as mni152_module

SMALL = dict(inplane_mm=[3.0, 3.5], slice_mm=[4.0, 5.0], margin_mm=[2.0, 6.0])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """T1 / GM / WM stand-ins on a 2 mm grid (uint8 0..255 like nilearn's files)."""
    root = tmp_path_factory.mktemp("template")
    shape = (40, 44, 36)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([15, 17, 13])[:, None, None, None]) ** 2).sum(0))
    wm = np.clip((0.75 - radius) * 8, 0, 1)
    gm = np.clip((1.0 - radius) * 8, 0, 1) - wm
    t1 = np.clip(0.45 * gm + 0.9 * wm, 0, 1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40, -44, -36]
    files = {}
    for key, data in (("t1", t1), ("gm", gm), ("wm", wm)):
        files[key] = root / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image((data * 255).round().astype(np.uint8), affine), str(files[key]))
    return files


def test_writes_an_msd_folder_of_differing_cases(tmp_path, template):
    path = write_mni152_tissue_decathlon(tmp_path / "ds", num_training=3, num_test=1, source=template, **SMALL)
    meta = json.loads(path.read_text())
    assert meta["labels"] == {str(i): n for i, n in enumerate(MNI152_LABELS)} and meta["modality"] == {"0": "T1"}
    assert len(meta["training"]) == 3 and meta["test"] == ["./imagesTs/mni152_t000.nii.gz"]
    assert meta["generator"]["num_training"] == 3 and meta["generator"]["inplane_mm"] == [3.0, 3.5]
    train, val, info = prepare_decathlon(path, num_val=1)  # validates every file and voxel
    assert info["num_classes"] == 3 and len(train) == 2 and len(val) == 1
    shapes, affines, maxima = set(), [], set()
    for item in meta["training"]:
        img, lab = (nib.load(str(tmp_path / "ds" / item[k])) for k in ("image", "label"))
        image, label = np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj)
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, 1, 2}  # every tissue present
        assert np.all(image[label == 0] >= 0) and np.all(image[label > 0] > 0)
        assert np.allclose(img.affine, lab.affine)
        shapes.add(image.shape)
        affines.append(img.affine)
        maxima.add(int(image.max()))
    assert len(shapes) == 3 and len(maxima) == 3  # three different grids and scanner scales
    assert not np.allclose(affines[0], affines[1])
    assert (tmp_path / "ds" / "imagesTs" / "mni152_t000.nii.gz").is_file()


def test_deterministic_and_ensure_checks_parameters(tmp_path, template):
    a = ensure_mni152_tissue_decathlon(tmp_path / "a", num_training=1, num_test=0, source=template, seed=3, **SMALL)
    b = write_mni152_tissue_decathlon(tmp_path / "b", num_training=1, num_test=0, source=template, seed=3, **SMALL)
    for root in (a.parent, b.parent):
        assert [p.name for p in root.iterdir()].count("dataset.json") == 1
    x, y = (np.asanyarray(nib.load(str(p.parent / "imagesTr" / "mni152_000.nii.gz")).dataobj) for p in (a, b))
    np.testing.assert_array_equal(x, y)
    assert ensure_mni152_tissue_decathlon(tmp_path / "a", num_training=1, seed=3) == a  # exists: only checks
    with pytest.raises(ValueError, match="seed"):
        ensure_mni152_tissue_decathlon(tmp_path / "a", num_training=1, seed=4)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_training": 0}, ValueError, "num_training"),
        ({"downsample": 0}, ValueError, "downsample"),
        ({"blur": 1.0}, ValueError, "unknown acquisition setting 'blur'"),
        ({"source": {"t1": "x.nii.gz"}}, ValueError, "'t1', 'gm' and 'wm'"),
    ],
)
def test_bad_arguments(tmp_path, template, kwargs, error, match):
    args = {"source": template, **kwargs}
    with pytest.raises(error, match=match):
        write_mni152_tissue_decathlon(tmp_path / "ds", **args)


def test_missing_nilearn_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mni152_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r'pip install -e "\.\[examples\]"'):
        mni152_template_files()


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason='needs nilearn: pip install -e ".[examples]"')
def test_real_template_from_nilearn(tmp_path):
    files = mni152_template_files()
    assert nib.load(str(files["t1"])).shape == (197, 233, 189)
    path = write_mni152_tissue_decathlon(tmp_path / "ds", num_training=1, num_test=0, downsample=4)
    meta = json.loads(path.read_text())
    item = {k: str(tmp_path / "ds" / v) for k, v in meta["training"][0].items()}
    validate_datalist([item], num_classes=3, num_modalities=1)
    label = np.asanyarray(nib.load(item["label"]).dataobj)
    shares = np.bincount(label.ravel(), minlength=3) / label.size
    assert shares[1] > 0.05 and shares[2] > 0.03  # grey and white matter both present
