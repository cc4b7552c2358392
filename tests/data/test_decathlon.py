import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from invseg.data import load_datalist, prepare_decathlon, read_dataset_info, split_datalist, validate_datalist


def _rewrite(path, data=None, affine=None):
    """Overwrite a NIfTI file with new data and/or affine, keeping the rest."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), path)


def _first(path, kind):
    return path.parent / json.loads(path.read_text())["training"][0][kind]


def test_load_datalist_uses_json_not_glob(msd):
    path = msd(num_volumes=3)
    junk = path.parent / "imagesTr" / "._synth_000.nii.gz"
    junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork, not NIfTI")
    datalist = load_datalist(path)
    assert len(datalist) == 3
    for item in datalist:
        assert set(item) == {"image", "label"}
        assert "._" not in item["image"]
        assert (path.parent / "imagesTr").samefile(type(path)(item["image"]).parent)
    validate_datalist(datalist, num_classes=2, num_modalities=1)  # the junk file is never opened


def test_read_dataset_info(msd):
    info = read_dataset_info(msd(num_volumes=2, num_classes=3, num_modalities=2))
    assert info["num_classes"] == 3 and info["label_names"][0] == "background"
    assert info["num_modalities"] == 2 and len(info["modality_names"]) == 2
    assert info["num_training"] == 2 and info["num_test"] == 0


def test_missing_json(tmp_path):
    missing = tmp_path / "nowhere" / "dataset.json"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_datalist(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dataset_info(missing)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(training=[]), r"'training' list in .*dataset.json is empty"),
        (lambda m: m.pop("training"), r"has no 'training' list"),
        (lambda m: m.update(training=["./imagesTr/a.nii.gz"]), r"malformed 'training'"),
    ],
)
def test_bad_training_list(msd, edit, message):
    path = msd(num_volumes=1)
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_datalist(path)


@pytest.mark.parametrize(
    "labels, message",
    [({}, "non-empty 'labels'"), ({"0": "bg", "2": "x"}, "without gaps"), ({"a": "bg"}, "must be integers")],
)
def test_bad_labels_dict(msd, labels, message):
    path = msd(num_volumes=1)
    meta = json.loads(path.read_text())
    meta["labels"] = labels
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        read_dataset_info(path)


def _missing_image(path):
    _first(path, "image").unlink()
    return FileNotFoundError, "image file not found", "imagesTr/synth_000.nii.gz"


def _missing_label(path):
    _first(path, "label").unlink()
    return FileNotFoundError, "label file not found", "labelsTr/synth_000.nii.gz"


def _label_shape(path):
    label = _first(path, "label")
    _rewrite(label, data=np.zeros((24, 24, 20), np.uint8))
    return ValueError, "same spatial shape", "labelsTr/synth_000.nii.gz"


def _affine(path):
    label = _first(path, "label")
    affine = nib.load(label).affine.copy()
    affine[0, 3] += 1.5  # one voxel shift in x
    _rewrite(label, affine=affine)
    return ValueError, "same affine", "labelsTr/synth_000.nii.gz"


def _label_value(path):
    label = _first(path, "label")
    data = np.asanyarray(nib.load(label).dataobj).copy()
    data[3, 4, 5] = 5
    _rewrite(label, data=data)
    return ValueError, r"values \[5\] outside the declared classes 0 \.\. 1", "labelsTr/synth_000.nii.gz"


def _label_fraction(path):
    label = _first(path, "label")
    data = np.asanyarray(nib.load(label).dataobj).astype(np.float32)
    data[3, 4, 5] = 0.5
    _rewrite(label, data=data)
    return ValueError, "integer class indices", "labelsTr/synth_000.nii.gz"


def _nan(path):
    image = _first(path, "image")
    data = nib.load(image).get_fdata(dtype=np.float32)
    data[1, 2, 3] = np.nan
    _rewrite(image, data=data)
    return ValueError, "finite intensities, found 1 NaN", "imagesTr/synth_000.nii.gz"


def _inf(path):
    image = _first(path, "image")
    data = nib.load(image).get_fdata(dtype=np.float32)
    data[1, 2, 3] = -np.inf
    _rewrite(image, data=data)
    return ValueError, "finite intensities", "imagesTr/synth_000.nii.gz"


def _modalities(path):
    meta = json.loads(path.read_text())
    meta["modality"] = {"0": "T1", "1": "T2"}  # declares 2, the images have 1
    path.write_text(json.dumps(meta))
    return ValueError, "must have 2 modalities", "imagesTr/synth_000.nii.gz"


def _image_2d(path):
    image = _first(path, "image")
    _rewrite(image, data=np.zeros((24, 24), np.float32))
    return ValueError, "must be 3D", "imagesTr/synth_000.nii.gz"


def _not_nifti(path):
    _first(path, "image").write_bytes(b"not a nifti file")
    return ValueError, "not a readable NIfTI", "imagesTr/synth_000.nii.gz"


@pytest.mark.parametrize(
    "corrupt",
    [_missing_image, _missing_label, _label_shape, _affine, _label_value, _label_fraction, _nan, _inf,
     _modalities, _image_2d, _not_nifti],
)  # fmt: skip
def test_bad_input_stops_before_training(msd, corrupt):
    path = msd(num_volumes=2)
    error, rule, filename = corrupt(path)
    with pytest.raises(error, match=rule) as info:
        prepare_decathlon(path, num_val=1)
    assert filename in str(info.value)


def test_multimodal_spatial_shape_mismatch(msd):
    path = msd(num_volumes=1, num_modalities=2)
    _rewrite(_first(path, "label"), data=np.zeros((24, 20, 24), np.uint8))
    with pytest.raises(ValueError, match=r"same spatial shape, got \(24, 24, 24\) and \(24, 20, 24\)"):
        prepare_decathlon(path, num_val=0)


def test_multimodal_multiclass_valid(msd):
    train, val, info = prepare_decathlon(msd(num_volumes=3, num_classes=3, num_modalities=2), num_val=1)
    assert (len(train), len(val), info["num_classes"], info["num_modalities"]) == (2, 1, 3, 2)


def test_check_values_false_reads_headers_only(msd):
    path = msd(num_volumes=1)
    _label_value(path)
    datalist = load_datalist(path)
    validate_datalist(datalist, num_classes=2, check_values=False)
    with pytest.raises(ValueError, match="outside the declared classes"):
        validate_datalist(datalist, num_classes=2)


def test_affine_within_tolerance_passes(msd):
    path = msd(num_volumes=1)
    label = _first(path, "label")
    affine = nib.load(label).affine.copy()
    affine[1, 3] += 1e-5
    _rewrite(label, affine=affine)
    validate_datalist(load_datalist(path), num_classes=2)


def test_one_file_per_modality(msd, tmp_path):
    """LoadImaged also accepts a list of 3D files per case (stacked as channels)."""
    path = msd(num_volumes=1)
    image = _first(path, "image")
    second = tmp_path / "second.nii.gz"
    shutil.copy(image, second)
    datalist = [{"image": [str(image), str(second)], "label": str(_first(path, "label"))}]
    validate_datalist(datalist, num_classes=2, num_modalities=2)
    with pytest.raises(ValueError, match="must have 3 modalities"):
        validate_datalist(datalist, num_classes=2, num_modalities=3)


@pytest.mark.parametrize(
    "datalist, kwargs, message",
    [
        ([], {"num_classes": 2}, "datalist is empty"),
        ([{"image": "a.nii.gz"}], {"num_classes": 2}, "no 'label' key"),
        ([{"image": "a.nii.gz", "label": "b.nii.gz"}], {"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_validate_arguments(datalist, kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_datalist(datalist, **kwargs)


CASES = [{"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"} for i in range(10)]


@pytest.mark.parametrize(
    "kwargs, num_val", [({}, 2), ({"val_fraction": 0.35}, 4), ({"val_fraction": 0.01}, 1), ({"val_fraction": 0.0}, 0),
                        ({"num_val": 3}, 3), ({"num_val": 9}, 9)]
)  # fmt: skip
def test_split_sizes_and_partition(kwargs, num_val):
    train, val = split_datalist(CASES, **kwargs)
    assert len(val) == num_val and len(train) == 10 - num_val
    names = sorted(c["image"] for c in train + val)
    assert names == sorted(c["image"] for c in CASES)
    assert train == sorted(train, key=CASES.index)  # original order kept


def test_split_deterministic_and_seeded():
    assert split_datalist(CASES, seed=1) == split_datalist(CASES, seed=1)
    vals = {tuple(c["image"] for c in split_datalist(CASES, seed=s)[1]) for s in range(5)}
    assert len(vals) > 1
    train, val = split_datalist(CASES)
    for case in train + val:
        case["image"] = "changed"  # entries are copies: the input list is untouched
    assert [c["image"] for c in CASES] == [f"img{i}.nii.gz" for i in range(10)]


@pytest.mark.parametrize(
    "datalist, kwargs", [([], {}), (CASES, {"val_fraction": 1.0}), (CASES, {"val_fraction": -0.1}),
                         (CASES, {"num_val": 10}), (CASES[:1], {"val_fraction": 0.5})]
)  # fmt: skip
def test_split_rejects_bad_requests(datalist, kwargs):
    with pytest.raises(ValueError):
        split_datalist(datalist, **kwargs)
