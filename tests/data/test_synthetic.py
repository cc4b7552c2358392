import json

import nibabel as nib
import numpy as np
import pytest

from invseg.data import ensure_synthetic_decathlon, write_synthetic_decathlon
from invseg.data import synthetic


@pytest.mark.parametrize("num_classes", [2, 3, 4])
@pytest.mark.parametrize("num_modalities", [1, 2])
def test_written_files_follow_msd_format(msd, num_classes, num_modalities):
    path = msd(num_volumes=4, num_classes=num_classes, num_modalities=num_modalities, spacing=(1.5, 1.5, 2.0))
    meta = json.loads(path.read_text())
    assert meta["numTraining"] == len(meta["training"]) == 4
    assert meta["test"] == [] and meta["numTest"] == 0
    assert meta["tensorImageSize"] == ("3D" if num_modalities == 1 else "4D")
    assert sorted(meta["modality"]) == [str(m) for m in range(num_modalities)]
    assert meta["labels"]["0"] == "background" and len(meta["labels"]) == num_classes
    seen = set()
    for entry in meta["training"]:
        assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
        image = nib.load(path.parent / entry["image"])
        label = nib.load(path.parent / entry["label"])
        expected_shape = (24, 24, 24) if num_modalities == 1 else (24, 24, 24, num_modalities)
        assert image.shape == expected_shape and image.get_data_dtype() == np.float32
        assert label.shape == (24, 24, 24) and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(np.diag(image.affine)[:3], (1.5, 1.5, 2.0))
        np.testing.assert_allclose(image.affine[:3, 3], (-18.0, -18.0, -24.0))
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_allclose(image.header.get_zooms()[:3], (1.5, 1.5, 2.0))
        values = np.asanyarray(label.dataobj)
        seen |= set(np.unique(values).tolist())
        data = image.get_fdata()
        assert np.isfinite(data).all()
        if num_modalities > 1:  # every modality shows the objects: brighter inside than outside
            for m in range(num_modalities):
                assert data[..., m][values > 0].mean() > data[..., m][values == 0].mean()
    assert seen == set(range(num_classes))


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic_decathlon(tmp_path / "a", num_volumes=2, size=(24, 24, 24), seed=3)
    b = write_synthetic_decathlon(tmp_path / "b", num_volumes=2, size=(24, 24, 24), seed=3)
    c = write_synthetic_decathlon(tmp_path / "c", num_volumes=2, size=(24, 24, 24), seed=4)
    name = "imagesTr/synth_001.nii.gz"
    load = lambda p: nib.load(p.parent / name).get_fdata()  # noqa: E731
    np.testing.assert_array_equal(load(a), load(b))
    assert not np.array_equal(load(a), load(c))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"num_modalities": 0},
        {"num_volumes": 0},
        {"size": (24, 24)},
        {"spacing": (1.0, 0.0, 1.0)},
        {"rad_max": 12},  # 2 * rad_max must be < 24
        {"rad_min": 5, "rad_max": 5},
        {"noise_max": -0.1},
    ],
)
def test_invalid_arguments_raise(tmp_path, kwargs):
    kwargs = {"size": (24, 24, 24), **kwargs}
    with pytest.raises(ValueError):
        write_synthetic_decathlon(tmp_path / "x", **kwargs)


def test_ensure_writes_once(tmp_path):
    root = tmp_path / "data" / "synthetic"
    path = ensure_synthetic_decathlon(root, num_volumes=2, size=(24, 24, 24))
    assert path == root / "dataset.json" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert ensure_synthetic_decathlon(root, num_volumes=2, size=(24, 24, 24)) == path
    assert path.stat().st_mtime_ns == stamp
    assert not list(root.parent.glob(".*partial*"))  # the staging folder is gone
    reference = tmp_path / "reference"
    reference.mkdir()  # the dataset folder gets the usual umask mode, not mkdtemp's 0o700
    assert root.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_ensure_into_existing_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert ensure_synthetic_decathlon(root, num_volumes=1, size=(24, 24, 24)).is_file()


def test_ensure_rejects_other_parameters(tmp_path):
    root = tmp_path / "s"
    ensure_synthetic_decathlon(root, num_volumes=2, size=(24, 24, 24), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        ensure_synthetic_decathlon(root, num_volumes=2, size=(24, 24, 24), num_classes=3)


def test_ensure_refuses_foreign_non_empty_folder(tmp_path):
    root = tmp_path / "mine"
    (root / "imagesTr").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="mine"):
        ensure_synthetic_decathlon(root, num_volumes=1, size=(24, 24, 24))


def test_interrupted_write_is_not_taken_as_done(tmp_path, monkeypatch):
    real = synthetic.write_synthetic_decathlon

    def interrupted(root, **kwargs):
        real(root, **kwargs)
        (root / "dataset.json").unlink()  # as if the process died before finishing
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_synthetic_decathlon", interrupted)
    root = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_decathlon(root, num_volumes=1, size=(24, 24, 24))
    assert not root.exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(synthetic, "write_synthetic_decathlon", real)
    assert ensure_synthetic_decathlon(root, num_volumes=1, size=(24, 24, 24)).is_file()
