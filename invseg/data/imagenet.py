"""ImageNet (ILSVRC2012) from class folders, with the paper's preprocessing (Appendix B.2).

Layout::

    root/train/<wnid>/*.JPEG    # e.g. root/train/n01440764/n01440764_10026.JPEG
    root/val/<wnid>/*.JPEG      # the 50 000 validation images sorted into the same wnid folders

The official validation archive is flat (``val/ILSVRC2012_val_00000001.JPEG`` ...): sort it into
wnid folders first (e.g. with the widely used ``valprep.sh``). Class indices follow the sorted wnid
names, identical for both splits (``torchvision.datasets.ImageFolder``).

Preprocessing: train = RandomResizedCrop(224), RandomHorizontalFlip, normalise with mean
(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); val = Resize to 256x256, CenterCrop(224),
normalise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "imagenet_datasets",
    "imagenet_transforms",
    "write_synthetic_imagenet",
]

PathLike = str | os.PathLike

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAYOUT = "expected root/{train,val}/<wnid>/*.JPEG with the same wnid folders in train/ and val/"
# first ImageNet-1k wnids (sorted), used for synthetic folders; more classes get made-up wnids
_WNIDS = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
    "n01496331", "n01498041", "n01514668", "n01514859", "n01518878",
)  # fmt: skip


def _is_image(path: str) -> bool:
    # skip hidden files such as macOS "._x.JPEG" resource forks that archives may carry
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)


def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise FileNotFoundError(f"ImageNet split folder not found: {split}; {_LAYOUT}")
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = any(_is_image(e.path) for e in os.scandir(split) if e.is_file())
        hint = " (it holds loose images: sort them into wnid folders, e.g. with valprep.sh)" if loose else ""
        raise ValueError(f"{split} has no class folders{hint}; {_LAYOUT}")
    return classes


def imagenet_datasets(
    root: PathLike,
    train_transform: Callable | None = None,
    val_transform: Callable | None = None,
) -> tuple[ImageFolder, ImageFolder]:
    """ImageNet train and val datasets from ``root/{train,val}/<wnid>/*.JPEG``.

    Args:
        root: folder holding ``train/`` and ``val/``.
        train_transform: applied to training PIL images, e.g. ``imagenet_transforms(True)``;
            default None (PIL images).
        val_transform: applied to validation images, e.g. ``imagenet_transforms(False)``; default None.

    Returns:
        ``(train, val)`` ``torchvision.datasets.ImageFolder`` objects with identical ``classes``;
        items are ``(image, class_index)``.

    Raises:
        FileNotFoundError: ``root``, ``train/`` or ``val/`` is missing.
        ValueError: no class folders, different wnid folders in train/ and val/, or a class folder
            without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root not found: {root}; {_LAYOUT}")
    train_classes = _class_folders(root / "train")
    val_classes = _class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            f"class folders of {root / 'train'} and {root / 'val'} differ: only in train {only_train[:10]}"
            f"{' ...' if len(only_train) > 10 else ''}, only in val {only_val[:10]}"
            f"{' ...' if len(only_val) > 10 else ''}; {_LAYOUT}"
        )
    datasets = []
    for split, transform in (("train", train_transform), ("val", val_transform)):
        try:
            datasets.append(ImageFolder(str(root / split), transform=transform, is_valid_file=_is_image))
        except FileNotFoundError as err:  # ImageFolder: a class folder without valid images
            raise ValueError(f"{root / split}: {err}; {_LAYOUT}") from err
    return datasets[0], datasets[1]


def imagenet_transforms(train: bool, size: int = 224, resize: int = 256) -> T.Compose:
    """The paper's ImageNet preprocessing (Appendix B.2) for PIL images.

    Args:
        train: True: RandomResizedCrop(size), RandomHorizontalFlip, ToTensor, Normalize;
            False: Resize((resize, resize)), CenterCrop(size), ToTensor, Normalize.
        size: output side (default 224).
        resize: side of the square resize before the validation centre crop (default 256).

    Returns:
        A torchvision ``Compose`` giving float32 tensors (3, size, size).
    """
    if size < 1 or resize < size:
        raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    return T.Compose([T.Resize((resize, resize)), T.CenterCrop(size), *normalize])


def write_synthetic_imagenet(
    root: PathLike,
    num_classes: int = 3,
    per_class_train: int = 4,
    per_class_val: int = 2,
    size: Sequence[int] = (64, 80),
    seed: int = 0,
) -> Path:
    """Write a tiny ImageNet-layout dataset of real JPEG files (class-coloured shapes on noise).

    Files: ``root/train/<wnid>/<wnid>_<k>.JPEG`` and ``root/val/<wnid>/ILSVRC2012_val_<k>.JPEG``.

    Args:
        root: output folder.
        num_classes: number of wnid folders, >= 1 (default 3).
        per_class_train: training images per class, >= 1 (default 4).
        per_class_val: validation images per class, >= 1 (default 2).
        size: image (height, width) (default (64, 80)).
        seed: random seed (default 0).

    Returns:
        ``root``.
    """
    if num_classes < 1 or per_class_train < 1 or per_class_val < 1:
        raise ValueError(
            "num_classes, per_class_train and per_class_val must be >= 1, got "
            f"{num_classes}, {per_class_train}, {per_class_val}"
        )
    height, width = (int(s) for s in size)
    if height < 8 or width < 8:
        raise ValueError(f"size must be at least (8, 8), got {tuple(size)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [_WNIDS[c] if c < len(_WNIDS) else f"n9{c:07d}" for c in range(num_classes)]
    colours = rng.uniform(40, 255, size=(num_classes, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    val_index = 1
    for c, wnid in enumerate(wnids):
        for split, count in (("train", per_class_train), ("val", per_class_val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                image = rng.uniform(0, 50, size=(height, width, 3))
                cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
                radius = rng.uniform(0.15, 0.3) * min(height, width)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colours[c]
                if split == "train":
                    name = f"{wnid}_{k + 1}.JPEG"
                else:
                    name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                    val_index += 1
                Image.fromarray(image.astype(np.uint8)).save(folder / name, format="JPEG", quality=90)
    return root
