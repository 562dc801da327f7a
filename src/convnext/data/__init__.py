"""Datasets, transforms and loaders (never imports `models`)."""

from .folder import (Batch, DataError, EpochSampler, ImageFiles, ImageFolder, LabelledFiles, ShardSampler,
                     check_same_classes, collate, split_folder)
from .images import IMG_EXTENSIONS, load_rgb, to_rgb, why_unreadable
from .transforms import eval_transform, mixup_cutmix, parse_aa, train_transform

__all__ = [
    "IMG_EXTENSIONS", "Batch", "DataError", "EpochSampler", "ImageFiles", "ImageFolder", "LabelledFiles", "ShardSampler",
    "check_same_classes", "collate", "split_folder", "eval_transform", "load_rgb", "mixup_cutmix", "parse_aa", "to_rgb",
    "train_transform", "why_unreadable",
]
