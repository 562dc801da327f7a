"""Fashion-MNIST (Zalando, MIT licence), embedded in the repo for the demo, as an image folder.

The four original idx gz files live in `data/fashion-mnist/` (from Debian's dataset-fashion-mnist).
`prepare()` writes them once as `ROOT/{train,val}/<class>/<n>.png` (val = the official 10k test
set), verifying the files' SHA-256 first; a finished tree is marked and never rewritten.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
from pathlib import Path

from PIL import Image

CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def source_dir() -> Path:
    """The embedded files: $CONVNEXT_FASHION_MNIST, else <repo>/data/fashion-mnist."""
    env = os.environ.get("CONVNEXT_FASHION_MNIST")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "data" / "fashion-mnist"


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[list[bytes], list[int]]:
    with gzip.open(images_gz, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{images_gz}: not an idx3 image file")
        data = f.read(n * rows * cols)
    with gzip.open(labels_gz, "rb") as f:
        magic, n_labels = struct.unpack(">II", f.read(8))
        if magic != 2049 or n_labels != n:
            raise ValueError(f"{labels_gz}: not the idx1 labels for {images_gz.name}")
        labels = list(f.read(n))
    size = rows * cols
    return [data[i * size:(i + 1) * size] for i in range(n)], labels


def prepare(root: str | os.PathLike, *, per_class: dict[str, int] | None = None, src: Path | None = None) -> Path:
    """Write Fashion-MNIST as an image folder under `root` (once) and return `root`.

    `per_class` (e.g. {"train": 20, "val": 10}) takes only the first N images of each class of each
    split: a stratified slice for tests.
    """
    root, src = Path(root), src or source_dir()
    if (root / ".complete").exists():
        return root
    for name, digest in FILES.items():
        path = src / name
        if not path.exists():
            raise FileNotFoundError(f"embedded Fashion-MNIST file missing: {path}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path}: SHA-256 mismatch; the embedded data is corrupt (git checkout data/)")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images, labels = read_idx(src / f"{prefix}-images-idx3-ubyte.gz", src / f"{prefix}-labels-idx1-ubyte.gz")
        limit = (per_class or {}).get(split)
        counts = [0] * len(CLASSES)
        for c in CLASSES:
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
        for i, (pixels, label) in enumerate(zip(images, labels)):
            if limit is not None and counts[label] >= limit:
                continue
            counts[label] += 1
            Image.frombytes("L", (28, 28), pixels).save(tmp / split / CLASSES[label] / f"{i:05d}.png")
    (tmp / "LICENSE").write_text("Fashion-MNIST, Copyright 2017 Zalando SE, MIT licence "
                                 "(https://github.com/zalandoresearch/fashion-mnist)\n")
    (tmp / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root
