"""Datasets, transforms and loaders (never imports `models`)."""

from .folder import DataError, EpochSampler, ImageFolder, ShardSampler, check_same_classes, collate
from .images import IMG_EXTENSIONS, load_rgb, to_rgb
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, mixup_cutmix, parse_aa, train_transform

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "DataError", "EpochSampler", "ImageFolder", "ShardSampler",
    "check_same_classes", "collate", "eval_transform", "load_rgb", "mixup_cutmix", "parse_aa", "to_rgb",
    "train_transform",
]
