import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset

from invseg.data import (
    load_datalist,
    make_loader,
    make_seg_datasets,
    seg_train_transforms,
    seg_val_transforms,
    split_datalist,
)


@pytest.mark.parametrize("num_classes, num_modalities", [(2, 1), (3, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("intensity", ["normalize", "range"])
def test_train_patches(msd, num_classes, num_modalities, intensity):
    datalist = load_datalist(msd(num_volumes=2, num_classes=num_classes, num_modalities=num_modalities))
    transform = seg_train_transforms(
        patch_size=(16, 12, 8), num_samples=3, intensity=intensity, a_min=0.0, a_max=1.0, pixdim=(1.5, 1.5, 2.0)
    )
    patches = transform(datalist[0])
    assert isinstance(patches, list) and len(patches) == 3
    for patch in patches:
        image, label = patch["image"], patch["label"]
        assert image.shape == (num_modalities, 16, 12, 8) and image.dtype == torch.float32
        assert label.shape == (1, 16, 12, 8)
        assert set(torch.unique(label).tolist()) <= set(range(num_classes))
        assert torch.isfinite(image).all()
        if intensity == "range":
            assert image.min() >= 0.0 and image.max() <= 1.0


def test_positive_only_patches_contain_foreground(msd):
    datalist = load_datalist(msd(num_volumes=2))
    transform = seg_train_transforms(patch_size=(8, 8, 8), num_samples=4, pos=1.0, neg=0.0, flip_prob=0.0)
    transform.set_random_state(seed=0)
    for item in datalist:
        for patch in transform(item):
            assert patch["label"].sum() > 0


def test_patch_larger_than_volume_is_padded(msd):
    datalist = load_datalist(msd(num_volumes=1))
    patches = seg_train_transforms(patch_size=(32, 32, 32), num_samples=1)(datalist[0])
    assert patches[0]["image"].shape == (1, 32, 32, 32)


def test_flips_change_patches(msd):
    datalist = load_datalist(msd(num_volumes=1))
    kwargs = {"patch_size": (24, 24, 24), "num_samples": 1, "crop_foreground": False}
    plain = seg_train_transforms(flip_prob=0.0, **kwargs)(datalist[0])[0]["image"]
    flipped = seg_train_transforms(flip_prob=1.0, **kwargs)(datalist[0])[0]["image"]
    torch.testing.assert_close(flipped, torch.flip(plain, dims=(1, 2, 3)))


@pytest.mark.parametrize("num_modalities", [1, 2])
def test_val_whole_volume_resampled(msd, num_modalities):
    datalist = load_datalist(msd(num_volumes=1, num_modalities=num_modalities, spacing=(1.5, 1.5, 2.0)))
    out = seg_val_transforms(pixdim=(2.0, 2.0, 2.0), crop_foreground=False)(datalist[0])
    # 24 voxels * 1.5 mm / 2 mm = 18; 24 * 2 / 2 = 24
    assert out["image"].shape == (num_modalities, 18, 18, 24) and out["label"].shape == (1, 18, 18, 24)
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], (2.0, 2.0, 2.0))
    for c in range(num_modalities):  # z-score over non-zero voxels, per channel
        channel = out["image"][c]
        assert abs(float(channel[channel != 0].mean())) < 1e-3


def test_val_image_only_keys(msd):
    datalist = load_datalist(msd(num_volumes=1))
    out = seg_val_transforms(keys=("image",))({"image": datalist[0]["image"]})
    assert out["image"].shape[0] == 1 and "label" not in out


def test_orientation_to_ras(tmp_path):
    """An LPS-stored volume is flipped to RAS; the label follows the image."""
    data = np.arange(24 * 24 * 24, dtype=np.float32).reshape(24, 24, 24) + 1
    label = (data > data.mean()).astype(np.uint8)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    out = seg_val_transforms(intensity=None, crop_foreground=False)(item)
    assert np.all(np.diag(out["image"].affine.numpy())[:3] > 0)
    np.testing.assert_array_equal(out["image"][0].numpy(), data[::-1, ::-1, :])
    np.testing.assert_array_equal(out["label"][0].numpy(), label[::-1, ::-1, :])


@pytest.mark.parametrize("cache, kind", [(True, CacheDataset), (False, Dataset)])
def test_datasets_and_loader(msd, cache, kind):
    train_list, val_list = split_datalist(load_datalist(msd(num_volumes=3, num_modalities=2)), num_val=1)
    train, val = make_seg_datasets(
        train_list,
        val_list,
        seg_train_transforms(patch_size=(8, 8, 8), num_samples=2),
        seg_val_transforms(),
        cache=cache,
    )
    assert isinstance(train, kind) and isinstance(val, kind) and (len(train), len(val)) == (2, 1)
    batch = next(iter(make_loader(train, batch_size=2, shuffle=True)))
    assert batch["image"].shape == (4, 2, 8, 8, 8) and batch["label"].shape == (4, 1, 8, 8, 8)
    val_batch = next(iter(make_loader(val, batch_size=1, shuffle=False)))
    assert val_batch["image"].shape[:2] == (1, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keys": ("image",)},
        {"intensity": "zscore"},
        {"patch_size": (16, 16)},
        {"num_samples": 0},
        {"pos": 0.0, "neg": 0.0},
        {"flip_prob": 1.5},
        {"pixdim": (1.0, 1.0)},
        {"intensity": "range", "a_min": 1.0, "a_max": 1.0},
    ],
)
def test_train_transform_arguments(kwargs):
    with pytest.raises(ValueError):
        seg_train_transforms(**kwargs)


def test_make_seg_datasets_arguments():
    with pytest.raises(ValueError, match="datalist_train is empty"):
        make_seg_datasets([], [], seg_train_transforms(), seg_val_transforms())
    with pytest.raises(ValueError, match="cache_rate"):
        make_seg_datasets([{"image": "a"}], [], seg_train_transforms(), seg_val_transforms(), cache_rate=2.0)
