import pickle

import numpy as np
import pytest
import torch

from invseg.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10Pickles,
    cifar10_transforms,
    make_loader,
    write_synthetic_cifar10,
)

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture
def cifar(tmp_path):
    write_synthetic_cifar10(tmp_path, num_train=50, num_test=20, seed=0)
    return tmp_path


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_files_match_the_official_format(cifar, encoding):
    folder = cifar / "cifar-10-batches-py"
    key = (lambda k: k.encode()) if encoding == "bytes" else (lambda k: k)  # py2 str keys
    total = 0
    for name in BATCHES:
        with open(folder / name, "rb") as f:
            assert f.read(2) == b"\x80\x02"  # pickle protocol 2
            f.seek(0)
            batch = pickle.load(f, encoding=encoding)
        assert set(batch) == {key("batch_label"), key("labels"), key("data"), key("filenames")}
        data = batch[key("data")]
        assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1] == 3072
        assert isinstance(batch[key("labels")], list) and all(type(c) is int for c in batch[key("labels")])
        assert len(batch[key("filenames")]) == len(data) == len(batch[key("labels")])
        total += len(data) if name != "test_batch" else 0
    assert total == 50
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding=encoding)
    assert meta[key("label_names")][0] == key("airplane") and meta[key("num_vis")] == 3072


def test_pixel_layout_round_trips_exactly(tmp_path):
    """Rows of b'data' are the R, G, B 32x32 planes in row-major order (written independently here)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    planes = rng.integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)  # (N, C, H, W)
    planes[0, 0, 0, 1] = 255  # red of row 0, column 1
    planes[0, 1, 0, 1] = 7
    planes[0, 2, 0, 1] = 9
    for name in BATCHES:
        batch = {b"batch_label": b"x", b"labels": [0, 1, 2, 3, 9], b"data": planes.reshape(5, 3072),
                 b"filenames": [b"a.png"] * 5}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    test = CIFAR10Pickles(tmp_path, train=False)
    np.testing.assert_array_equal(test.data, planes.transpose(0, 2, 3, 1))
    assert test.targets == [0, 1, 2, 3, 9]
    image, target = test[0]
    assert image.size == (32, 32) and image.mode == "RGB" and target == 0
    assert image.getpixel((1, 0)) == (255, 7, 9)  # PIL: (x=column, y=row)
    assert len(CIFAR10Pickles(tmp_path, train=True)) == 25
    assert CIFAR10Pickles(tmp_path).classes[9] == "truck"  # no batches.meta: standard names


def test_synthetic_read_back(cifar):
    train = CIFAR10Pickles(cifar, train=True)
    test = CIFAR10Pickles(cifar / "cifar-10-batches-py", train=False)  # the batches folder itself
    assert len(train) == 50 and len(test) == 20
    assert train.data.shape == (50, 32, 32, 3) and train.data.dtype == np.uint8
    assert np.bincount(train.targets, minlength=10).tolist() == [5] * 10
    assert train.classes[:2] == ["airplane", "automobile"]
    with open(cifar / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(test.data.transpose(0, 3, 1, 2).reshape(20, -1), raw[b"data"])


def test_synthetic_images_depend_on_class(cifar):
    """Nearest class-mean colour classifies the test images: a small model can learn this data."""
    train, test = CIFAR10Pickles(cifar), CIFAR10Pickles(cifar, train=False)

    def features(d):  # mean colour of the 64 brightest pixels (inside the disc)
        px = d.data.reshape(len(d), -1, 3).astype(np.float64)
        bright = np.argsort(px.sum(-1), axis=1)[:, -64:]
        return np.take_along_axis(px, bright[..., None], axis=1).mean(1)

    f_train, y_train = features(train), np.array(train.targets)
    centroids = np.stack([f_train[y_train == c].mean(0) for c in range(10)])
    pred = np.argmin(((features(test)[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == np.array(test.targets)).mean() >= 0.9


def test_transforms(cifar):
    train = CIFAR10Pickles(cifar, transform=cifar10_transforms(train=True))
    x, y = train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    test = CIFAR10Pickles(cifar, train=False, transform=cifar10_transforms(train=False))
    x, _ = test[0]
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    expected = (torch.from_numpy(test.data[0]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    names = [type(t).__name__ for t in cifar10_transforms(train=True).transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert cifar10_transforms(train=True).transforms[0].padding == 4
    batch = next(iter(make_loader(train, batch_size=8, shuffle=True)))
    assert batch[0].shape == (8, 3, 32, 32) and batch[1].shape == (8,)


def test_missing_batch_file(cifar):
    (cifar / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3.*cifar-10-batches-py/\{data_batch_1"):
        CIFAR10Pickles(cifar, train=True)
    CIFAR10Pickles(cifar, train=False)  # the test split does not need it


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10Pickles(tmp_path / "nothing")


def test_truncated_file(cifar):
    path = cifar / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR-10 pickle"):
        CIFAR10Pickles(cifar, train=False)


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"labels": [0]}, "no b'data'"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"shape \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must be 2 ints"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"0\.\.9"),
        ([1, 2], "must hold a dict"),
    ],
)
def test_malformed_batch(cifar, batch, message):
    with open(cifar / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=message) as info:
        CIFAR10Pickles(cifar, train=False)
    assert "test_batch" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"num_train": 4}, {"num_test": 0}])
def test_writer_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_cifar10(tmp_path, **kwargs)
