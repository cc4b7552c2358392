"""CIFAR-10 from the standard ``cifar-10-batches-py`` pickles, with the paper's augmentation.

Layout (the python version of the official archive, unchanged)::

    root/cifar-10-batches-py/data_batch_1 .. data_batch_5   # training, 10000 images each
    root/cifar-10-batches-py/test_batch                     # test, 10000 images
    root/cifar-10-batches-py/batches.meta                   # label names

Each batch is a Python-2 pickle (protocol 2) of a dict with byte-string keys: ``b'data'`` uint8
(N, 3072) with the R, G and B 32x32 planes of each image in row-major order, ``b'labels'`` a list
of N ints in 0..9, ``b'batch_label'`` and ``b'filenames'``. It is read with
``pickle.load(f, encoding="bytes")``. We read the files directly: torchvision's ``CIFAR10``
verifies md5 sums and so rejects any other file (test fixtures, re-packed copies).

Augmentation (paper, Appendix B.1): train = random crop 32 with padding 4, random horizontal flip,
per-channel normalisation with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010);
test = normalisation only.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "CIFAR10Pickles",
    "cifar10_transforms",
    "write_synthetic_cifar10",
]

PathLike = str | os.PathLike

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_META_FILE = "batches.meta"
_LAYOUT = (
    f"expected root/{_FOLDER}/{{data_batch_1..data_batch_5, test_batch, batches.meta}} "
    "as in the python version of the official archive (cifar-10-python.tar.gz)"
)


def _find_folder(root: Path) -> Path:
    if (root / _FOLDER).is_dir():
        return root / _FOLDER
    if (root / _TEST_FILE).is_file() or (root / _TRAIN_FILES[0]).is_file():
        return root  # root is the batches folder itself
    raise FileNotFoundError(f"CIFAR-10 folder not found: {root / _FOLDER}; {_LAYOUT}")


def _load_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file not found: {path}; {_LAYOUT}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated file, not a pickle, ...
        raise ValueError(f"{path} is not a readable CIFAR-10 pickle ({err}); {_LAYOUT}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a dict, got {type(obj).__name__}; {_LAYOUT}")
    # py2 pickles read with encoding="bytes" give bytes keys; accept str keys of re-pickled copies
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise ValueError(f"{path} has no b'{key}' entry (keys: {sorted(batch)}); {_LAYOUT}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"b'data' in {path} must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"b'labels' in {path} must be {data.shape[0]} ints, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"b'labels' in {path} must lie in 0..9, got {labels.min()}..{labels.max()}")
    # (N, 3072) = (N, 3 planes, 32 rows, 32 cols) -> (N, 32, 32, 3) HWC
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


class CIFAR10Pickles(Dataset):
    """CIFAR-10 read from the ``cifar-10-batches-py`` pickles, without md5 checks or downloads.

    Items are ``(transform(PIL image), int label)``, as in ``torchvision.datasets.CIFAR10``.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or that folder itself).
        train: the five training batches (default True) or ``test_batch``.
        transform: applied to the 32x32 RGB PIL image, e.g. :func:`cifar10_transforms`; default
            None returns the PIL image.
        target_transform: applied to the int label; default None.

    Attributes:
        data: uint8 array (N, 32, 32, 3), HWC RGB.
        targets: list of N ints.
        classes: label names from ``batches.meta`` (the standard names if it is absent).

    Raises:
        FileNotFoundError: a batch file is missing (the message names it and the expected layout).
        ValueError: a batch file is malformed.
    """

    def __init__(
        self,
        root: PathLike,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        self.root = Path(root)
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        folder = _find_folder(self.root)
        parts = [_read_batch(folder / name) for name in (_TRAIN_FILES if train else (_TEST_FILE,))]
        self.data = np.concatenate([p[0] for p in parts])
        self.targets = np.concatenate([p[1] for p in parts]).tolist()
        if len(self.targets) == 0:
            raise ValueError(f"no images in the CIFAR-10 {'training' if train else 'test'} batches under {folder}")
        self.classes = list(CIFAR10_CLASSES)
        if (folder / _META_FILE).is_file():
            names = _load_pickle(folder / _META_FILE).get("label_names")
            if not isinstance(names, list) or len(names) != 10:
                raise ValueError(f"b'label_names' in {folder / _META_FILE} must be a list of 10 names, got {names!r}")
            self.classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image: Any = Image.fromarray(self.data[index])
        target: Any = self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def cifar10_transforms(train: bool) -> T.Compose:
    """The paper's CIFAR-10 preprocessing (Appendix B.1) for PIL images.

    Args:
        train: True: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize;
            False: ToTensor, Normalize.

    Returns:
        A torchvision ``Compose`` giving float32 tensors (3, 32, 32).
    """
    normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if train:
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    return T.Compose(normalize)


class _Py2Pickler(pickle._Pickler):
    """Pickler writing ``bytes`` as Python-2 ``str`` opcodes, as in the official CIFAR files.

    Python 3 pickles bytes with protocol 2 as a ``_codecs.encode`` call; the official files contain
    Python-2 strings (``SHORT_BINSTRING``/``BINSTRING``), which ``encoding="bytes"`` turns into bytes
    and ``encoding="latin1"`` into str. Writing the same opcodes makes fixtures behave like real files
    under either encoding.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        # numpy 2 names its array reconstructor numpy._core.multiarray; the official files (and
        # numpy 1) use numpy.core.multiarray, which numpy 2 still resolves when loading
        if getattr(obj, "__module__", None) == "numpy._core.multiarray" and (name or obj.__name__) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump_py2(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # one colour per class, a blob at a random place on a dim noisy background: learnable in a few steps
    palette = np.array(
        [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]],
        dtype=np.float64,
    )  # fmt: skip
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    images = rng.uniform(0, 60, size=(n, 32, 32, 3))
    for i, c in enumerate(labels):
        cy, cx = rng.uniform(9, 23, size=2)
        radius = rng.uniform(5, 9)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        images[i][mask] = palette[c] * rng.uniform(0.9, 1.0) + rng.normal(0, 8, size=(mask.sum(), 3))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)  # (N, 32, 32, 3)


def write_synthetic_cifar10(root: PathLike, num_train: int = 50, num_test: int = 20, seed: int = 0) -> Path:
    """Write a small CIFAR-10 in the official ``cifar-10-batches-py`` pickle format.

    Images are class-coloured discs on noise (balanced classes), so that a tiny training run can
    learn; files, keys, dtypes and the Python-2 pickle opcodes match the official archive.

    Args:
        root: folder in which ``cifar-10-batches-py/`` is created.
        num_train: training images, split over the five ``data_batch_*`` files, >= 5 (default 50).
        num_test: images in ``test_batch``, >= 1 (default 20).
        seed: random seed (default 0).

    Returns:
        The path of the ``cifar-10-batches-py`` folder.
    """
    if num_train < len(_TRAIN_FILES):
        raise ValueError(f"num_train must be >= {len(_TRAIN_FILES)} (one image per training batch), got {num_train}")
    if num_test < 1:
        raise ValueError(f"num_test must be >= 1, got {num_test}")
    folder = Path(root) / _FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(labels: np.ndarray, batch_label: str, start: int) -> dict[bytes, Any]:
        hwc = _synthetic_images(labels, rng)
        return {
            b"batch_label": batch_label.encode(),
            b"labels": [int(c) for c in labels],
            b"data": np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)),
            b"filenames": [f"{CIFAR10_CLASSES[c]}_s_{start + i:06d}.png".encode() for i, c in enumerate(labels)],
        }

    train_labels = rng.permutation(np.arange(num_train) % 10)
    start = 0
    for i, labels in enumerate(np.array_split(train_labels, len(_TRAIN_FILES))):
        _dump_py2(batch(labels, f"training batch {i + 1} of 5", start), folder / _TRAIN_FILES[i])
        start += len(labels)
    test_labels = rng.permutation(np.arange(num_test) % 10)
    _dump_py2(batch(test_labels, "testing batch 1 of 1", start), folder / _TEST_FILE)
    meta = {
        b"num_cases_per_batch": int(-(-num_train // len(_TRAIN_FILES))),
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    _dump_py2(meta, folder / _META_FILE)
    return folder
