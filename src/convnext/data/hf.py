"""Hugging Face `datasets` as a data source: `--data hf:PATH_OR_NAME` (a `save_to_disk` folder, a folder of
parquet/arrow files such as a hub snapshot, or a hub name found in the local cache).

Random access, indexed like our folders: sample i of a split is row i, so the `(seed, epoch, index)` seeding,
the epoch sampler, mid-epoch resume and DDP sharding are the folder's, unchanged. Images are decoded by our
`load_rgb` from the stored bytes (the `Image` feature with `decode=False`), so an unreadable one is skipped and
reported as a file's would be. Classes: the label column's `ClassLabel` names, else its sorted distinct values.
Split names as the hub's: `train`, `validation` (also found as `val` / `valid`), `test`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .folder import ImageFolder, _label_lookup

PREFIX = "hf:"
SPLIT_ALIASES = {"validation": ("validation", "val", "valid"), "val": ("validation", "val", "valid")}


def is_hf(data: str | os.PathLike | None) -> bool:
    return isinstance(data, str) and data.startswith(PREFIX)


def require_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("--data hf:... needs the Hugging Face `datasets` library: pip install 'convnext[data]'") from None
    return datasets


def open_split(source: str, split: str):
    """The `split` (a `datasets.Dataset`) of `source` (`hf:` stripped)."""
    datasets = require_datasets()
    path = Path(source)
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))  # save_to_disk
        elif path.is_dir():
            ds = datasets.load_dataset(str(path))  # parquet / arrow files, split by their names (hub layout)
        elif path.exists():
            raise DataError(f"hf:{source} is a file: give the dataset's folder (save_to_disk or parquet files)")
        else:
            ds = datasets.load_dataset(source)  # a hub name: offline, what the local cache holds
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line says which source and why
        raise DataError(f"hf:{source}: cannot open it as a Hugging Face dataset ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, datasets.Dataset):
        return ds
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in ds:
            return ds[name]
    raise DataError(f"hf:{source} has no split {split!r} (it has {', '.join(ds)}): choose one with --split / "
                    f"--train-split / --val-split")


def _columns(ds, image_key: str | None, label_key: str | None, source: str) -> tuple[str, str | None]:
    datasets = require_datasets()
    feats = ds.features
    if image_key is None:
        image_key = next((k for k, f in feats.items() if isinstance(f, datasets.Image)),
                         "image" if "image" in feats else None)
    if image_key not in feats:
        raise DataError(f"hf:{source}: no image column {image_key!r} (columns: {', '.join(feats)}); "
                        f"name it with --image-key")
    if label_key is None:
        label_key = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)),
                         next((k for k in ("label", "labels", "cls", "target") if k in feats), None))
    elif label_key not in feats:
        raise DataError(f"hf:{source}: no label column {label_key!r} (columns: {', '.join(feats)}); "
                        f"name it with --label-key")
    return image_key, label_key


def _class_names(ds, label_key: str, where: str, multi: bool) -> tuple[list[str], list[list[int]]]:
    """(class names, each row's indices into them): a ClassLabel's names; ints i -> "0" .. "max" (label i is class
    i); strings -> their sorted distinct values. `multi`: each row a list of those (a `List(ClassLabel)` column)."""
    datasets = require_datasets()
    feature, raw = ds.features[label_key], list(ds[label_key])
    inner = getattr(feature, "feature", None) if multi else feature  # List / Sequence of ...
    if multi and not all(isinstance(v, list) for v in raw):
        raise DataError(f"{where}: --multi-label needs a list of classes per image in {label_key!r} ({feature})")
    rows = raw if multi else [[v] for v in raw]
    flat = [v for r in rows for v in r]
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names), [[int(v) for v in r] for r in rows]
    if flat and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in flat):
        return [str(i) for i in range(max(flat) + 1)], rows
    if flat and all(isinstance(v, str) for v in flat):
        names = sorted(set(flat))
        index = {n: i for i, n in enumerate(names)}
        return names, [[index[v] for v in r] for r in rows]
    raise DataError(f"{where}: the {label_key!r} column holds {feature} values, not "
                    f"{'classes' if multi else 'one class'} (a name or an index >= 0) per image"
                    + ("" if multi else " (a list per image: pass --multi-label)"))


class HFImages(ImageFolder):
    """A split of a Hugging Face dataset as an `ImageFolder` (items, caching, seeding and errors the same).
    `classes`: the training split's (at validation / eval): labels are matched by name, or by index."""

    def __init__(self, source: str, split: str, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, seed: int | None = 0, cache: bool = False, exif: bool = True,
                 image_key: str | None = None, label_key: str | None = None, multi_label: bool = False) -> None:
        datasets = require_datasets()
        source = source[len(PREFIX):] if is_hf(source) else str(source)
        ds = open_split(source, split)
        self.source, self.split, self.exif = source, ds.split and str(ds.split) or split, exif
        self.root = Path(source)
        self.image_key, label_key = _columns(ds, image_key, label_key, source)
        if label_key is None:
            raise DataError(f"hf:{source} [{split}]: no label column (columns: {', '.join(ds.features)}); name it "
                            f"with --label-key")
        own, rows = _class_names(ds, label_key, f"hf:{source} [{split}]", multi_label)
        self.classes = list(classes) if classes is not None else own
        lookup = _label_lookup(self.classes)
        unknown = sorted({own[v] for r in rows for v in r} - set(lookup))
        if unknown:
            raise DataError(f"hf:{source} [{split}]: label {unknown[0]!r} is not one of the {len(self.classes)} "
                            f"classes ({', '.join(self.classes[:3])}, ...)")
        self._targets = [tuple(sorted({lookup[own[v]] for v in r})) if multi_label else lookup[own[r[0]]]
                         for r in rows]
        self.ds = ds.select_columns([self.image_key]).cast_column(self.image_key, datasets.Image(decode=False))
        self.transform, self.seed = transform, seed
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def targets(self) -> list[int]:
        return list(self._targets)

    def target(self, index: int) -> int:
        return self._targets[index]

    def file(self, index: int):
        item = self.ds[index][self.image_key]
        return io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"]

    def sample_name(self, index: int) -> str:
        return f"hf:{self.source}[{self.split}]#{index}"
