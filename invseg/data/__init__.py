"""invseg.data: datasets in their real on-disk formats, and synthetic data written in those formats.

Nothing here downloads: real data are read unchanged from disk; tests and default runs write small
synthetic datasets with the same layout.

3D segmentation (Medical Segmentation Decathlon layout, NIfTI, MONAI):
    read_dataset_info           summary of dataset.json (classes, modalities)
    load_datalist               file list of dataset.json via monai's load_decathlon_datalist
    validate_datalist           check files, shapes, affines, label values, finite intensities
    split_datalist              deterministic train/validation split
    prepare_decathlon           read + validate + split in one call
    seg_train_transforms        MONAI dictionary transforms with pos/neg patch sampling and flips
    seg_val_transforms          deterministic whole-volume transforms
    make_seg_datasets           CacheDataset / Dataset pair
    UnreadableImageError        a listed file that cannot be read (named, with the rule)
    read_voxels                 all voxels of a file, or UnreadableImageError
    LoadImageChecked            LoadImaged that names the file it cannot read
    find_unreadable             that error behind MONAI's "applying transform" wrapper
    resampled_shape             a file's grid after reorientation and resampling (header only)
    intensity_warnings          messages for an intensity setting that does not suit the data
    write_synthetic_decathlon   synthetic spheres as .nii.gz + dataset.json
    ensure_synthetic_decathlon  write the synthetic dataset on first use only
    write_mni152_tissue_decathlon   real-MRI example: grey/white matter on re-acquired MNI152 T1s
    ensure_mni152_tissue_decathlon  write it on first use only (template files from nilearn)
    mni152_template_files       where the installed nilearn keeps the MNI152 2009a files

Classification (paper, Appendix B):
    CIFAR10Pickles              CIFAR-10 from cifar-10-batches-py pickles (no md5 check)
    cifar10_transforms          pad-4 random crop, flip, per-channel normalisation
    write_synthetic_cifar10     class-coloured images in the official pickle format
    imagenet_datasets           ImageFolder train/val from root/{train,val}/<wnid>/*.JPEG
    imagenet_transforms         RandomResizedCrop 224 / Resize 256x256 + CenterCrop 224
    write_synthetic_imagenet    tiny JPEG class folders

Loading:
    make_loader                 DataLoader (optionally DistributedSampler) for any dataset above
"""

from invseg.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10Pickles,
    cifar10_transforms,
    write_synthetic_cifar10,
)
from invseg.data.decathlon import (
    load_datalist,
    prepare_decathlon,
    read_dataset_info,
    split_datalist,
    validate_datalist,
)
from invseg.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_datasets,
    imagenet_transforms,
    write_synthetic_imagenet,
)
from invseg.data.loaders import make_loader
from invseg.data.mni152 import (
    MNI152_LABELS,
    ensure_mni152_tissue_decathlon,
    mni152_template_files,
    write_mni152_tissue_decathlon,
)
from invseg.data.synthetic import ensure_synthetic_decathlon, write_synthetic_decathlon
from invseg.data.decathlon import UnreadableImageError, read_voxels
from invseg.data.transforms import (
    LoadImageChecked,
    find_unreadable,
    intensity_warnings,
    make_seg_datasets,
    resampled_shape,
    seg_train_transforms,
    seg_val_transforms,
)

__all__ = [
    # 3D segmentation
    "read_dataset_info",
    "load_datalist",
    "validate_datalist",
    "split_datalist",
    "prepare_decathlon",
    "seg_train_transforms",
    "seg_val_transforms",
    "make_seg_datasets",
    "UnreadableImageError",
    "read_voxels",
    "LoadImageChecked",
    "find_unreadable",
    "resampled_shape",
    "intensity_warnings",
    "write_synthetic_decathlon",
    "ensure_synthetic_decathlon",
    "MNI152_LABELS",
    "mni152_template_files",
    "write_mni152_tissue_decathlon",
    "ensure_mni152_tissue_decathlon",
    # classification
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "CIFAR10Pickles",
    "cifar10_transforms",
    "write_synthetic_cifar10",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "imagenet_datasets",
    "imagenet_transforms",
    "write_synthetic_imagenet",
    # loading
    "make_loader",
]
