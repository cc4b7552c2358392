import shutil

import pytest
import torch
from PIL import Image

from invseg.data import imagenet_datasets, imagenet_transforms, make_loader, write_synthetic_imagenet


@pytest.fixture
def imagenet(tmp_path):
    return write_synthetic_imagenet(tmp_path / "imagenet", num_classes=3, per_class_train=4, per_class_val=2)


def test_written_layout(imagenet):
    wnids = sorted(p.name for p in (imagenet / "train").iterdir())
    assert wnids == ["n01440764", "n01443537", "n01484850"]
    files = sorted((imagenet / "train" / wnids[0]).iterdir())
    assert [f.name for f in files] == [f"n01440764_{k}.JPEG" for k in range(1, 5)]
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.size == (80, 64) and image.mode == "RGB"
    assert len(list((imagenet / "val").rglob("ILSVRC2012_val_*.JPEG"))) == 6


def test_datasets_and_transforms(imagenet):
    (imagenet / "train" / "n01440764" / "._n01440764_1.JPEG").write_bytes(b"\x00\x05\x16\x07 resource fork")
    train, val = imagenet_datasets(imagenet, imagenet_transforms(train=True), imagenet_transforms(train=False))
    assert (len(train), len(val)) == (12, 6)
    assert train.classes == val.classes and train.class_to_idx == val.class_to_idx
    x, y = train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    v1, yv = val[5]
    v2, _ = val[5]
    assert v1.shape == (3, 224, 224) and yv == 2
    torch.testing.assert_close(v1, v2)  # validation preprocessing is deterministic
    batch = next(iter(make_loader(train, batch_size=4, shuffle=True)))
    assert batch[0].shape == (4, 3, 224, 224)


def test_transform_recipe():
    names = [type(t).__name__ for t in imagenet_transforms(train=True).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    resize, crop = imagenet_transforms(train=False).transforms[:2]
    assert list(resize.size) == [256, 256] and list(crop.size) == [224, 224]
    with pytest.raises(ValueError):
        imagenet_transforms(train=False, size=300, resize=256)


def test_mismatched_class_folders(imagenet):
    shutil.rmtree(imagenet / "val" / "n01443537")
    with pytest.raises(ValueError, match=r"differ: only in train \['n01443537'\], only in val \[\]"):
        imagenet_datasets(imagenet)


def test_missing_split(imagenet):
    shutil.rmtree(imagenet / "val")
    with pytest.raises(FileNotFoundError, match=r"imagenet/val.*root/\{train,val\}/<wnid>/\*\.JPEG"):
        imagenet_datasets(imagenet)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        imagenet_datasets(tmp_path / "nowhere")


def test_flat_val_folder(imagenet):
    val = imagenet / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for folder in [p for p in val.iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(ValueError, match="loose images: sort them into wnid folders"):
        imagenet_datasets(imagenet)


def test_empty_class_folder(imagenet):
    for image in (imagenet / "val" / "n01484850").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match="n01484850"):
        imagenet_datasets(imagenet)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"per_class_val": 0}, {"size": (4, 80)}])
def test_writer_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_imagenet(tmp_path, **kwargs)
