"""The one place a `--data` value becomes a split's dataset: a folder (`DATA/<split>/<class>/*`), a Hugging
Face dataset (`hf:`, `data.hf`) or WebDataset shards (`wds:`, `data.wds`). Training and evaluation both open
their splits here."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .errors import DataError

PREFIXES = ("hf:", "wds:")


def kind(data: Any) -> str:
    """"hf", "wds" or "folder"."""
    text = str(data) if isinstance(data, (str, os.PathLike)) else ""
    return next((p[:-1] for p in PREFIXES if text.startswith(p)), "folder")


def open_split(data: str, split: str, transform: Callable | None = None, *, classes: Sequence[str] | None = None,
               seed: int | None = 0, cache: bool = False, exif: bool = True, image_key: str | None = None,
               label_key: str | None = None, multi_label: bool = False):
    """Split `split` of an `hf:` or `wds:` source as an ImageFolder-like dataset (items `(image, class, index)`)."""
    if kind(data) == "hf":
        from .hf import HFImages

        return HFImages(data, split, transform, classes=classes, seed=seed, cache=cache, exif=exif,
                        image_key=image_key, label_key=label_key, multi_label=multi_label)
    if kind(data) == "wds":
        from .wds import WdsImages

        return WdsImages(data, split, transform, classes=classes, seed=seed, cache=cache, exif=exif,
                         image_key=image_key, label_key=label_key, multi_label=multi_label)
    raise DataError(f"{data}: not an hf: or wds: source")
