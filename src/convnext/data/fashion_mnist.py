"""Fashion-MNIST (Zalando, MIT licence) for the demo, as an image folder.

The four original idx gz files are embedded in the repository (`data/fashion-mnist/`, from
Debian's dataset-fashion-mnist). `source_dir()` finds them: $CONVNEXT_FASHION_MNIST, else the
checkout's copy, else a download from Zalando's mirror into the cache (an installed package has
no checkout). Every copy is verified: the SHA-256 of its decompressed data (the same data
whatever the gzip) or the MD5 Zalando publishes for its gz files. `prepare()` writes them once
as `ROOT/{train,val}/<class>/<n>.png` (val = the official 10k test set); a finished tree is
marked and never rewritten.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from pathlib import Path

from PIL import Image

from ..utils import cache_dir, temp_file
from .folder import write_once

logger = logging.getLogger(__name__)

CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
# file -> (SHA-256 of the decompressed idx data, MD5 of Zalando's gz as published in their README)
FILES = {
    "train-images-idx3-ubyte.gz": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                                   "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                                   "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                                  "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                                  "bb300cfdad3c16e7a12a480ee83cd310"),
}
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # Zalando's mirror (as torchvision's)
_CHECKOUT = Path(__file__).resolve().parents[3] / "data" / "fashion-mnist"


def genuine(name: str, raw: bytes) -> bool:
    """Whether `raw` is the genuine file `name` (decompressed SHA-256, or Zalando's gz MD5)."""
    content_sha, gz_md5 = FILES[name]
    if hashlib.md5(raw, usedforsecurity=False).hexdigest() == gz_md5:
        return True
    try:
        return hashlib.sha256(gzip.decompress(raw)).hexdigest() == content_sha
    except (OSError, EOFError):  # not gzip, truncated
        return False


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def download(folder: Path, url: str) -> None:
    """Fetch the files missing from `folder` from `url` (a base URL), each verified before it is kept."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (folder / name).is_file():
            continue
        tmp = Path(temp_file(folder, prefix=f".{name}.", suffix=".part"))
        try:
            try:
                torch.hub.download_url_to_file(url.rstrip("/") + "/" + name, str(tmp), progress=False)
            except Exception as e:  # noqa: BLE001 - offline, 404, ...: say how to do without
                raise FileNotFoundError(
                    f"Fashion-MNIST is not in this installation and could not be downloaded from {url} "
                    f"({type(e).__name__}: {e}); set CONVNEXT_FASHION_MNIST to a folder holding the four .gz "
                    f"files (a checkout's data/fashion-mnist)") from None
            if not genuine(name, tmp.read_bytes()):
                raise ValueError(f"{url.rstrip('/')}/{name}: the download does not match the published hash; "
                                 "discarded")
            os.replace(tmp, folder / name)
        finally:
            tmp.unlink(missing_ok=True)


def source_dir() -> Path:
    """The four gz files: $CONVNEXT_FASHION_MNIST, else the checkout's copy, else downloaded to the cache.

    The download comes from $CONVNEXT_FASHION_MNIST_URL (default: Zalando's mirror).
    """
    env = os.environ.get("CONVNEXT_FASHION_MNIST")
    if env:
        if not _complete(Path(env)):
            raise FileNotFoundError(f"CONVNEXT_FASHION_MNIST={env} does not hold the four Fashion-MNIST .gz files "
                                    f"({', '.join(FILES)})")
        return Path(env)
    if _complete(_CHECKOUT):
        return _CHECKOUT
    folder = cache_dir() / "fashion-mnist"
    if not _complete(folder):
        url = os.environ.get("CONVNEXT_FASHION_MNIST_URL", URL)
        logger.info("downloading Fashion-MNIST from %s to %s", url, folder)
        download(folder, url)
    return folder


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
    src = src or source_dir()

    def build(tmp: Path) -> None:
        for name in FILES:
            path = src / name
            if not path.exists():
                raise FileNotFoundError(f"embedded Fashion-MNIST file missing: {path}")
            if not genuine(name, path.read_bytes()):
                raise ValueError(f"{path}: does not match the published Fashion-MNIST data (corrupt copy?)")
        for split, prefix in (("train", "train"), ("val", "t10k")):
            images, labels = read_idx(src / f"{prefix}-images-idx3-ubyte.gz", src / f"{prefix}-labels-idx1-ubyte.gz")
            limit = (per_class or {}).get(split)
            counts = [0] * len(CLASSES)
            for c in CLASSES:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
            for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                if limit is not None and counts[label] >= limit:
                    continue
                counts[label] += 1
                Image.frombytes("L", (28, 28), pixels).save(tmp / split / CLASSES[label] / f"{i:05d}.png")
        (tmp / "LICENSE").write_text("Fashion-MNIST, Copyright 2017 Zalando SE, MIT licence "
                                     "(https://github.com/zalandoresearch/fashion-mnist)\n")

    return write_once(root, repr(sorted((per_class or {}).items())), build)  # marker: which slice it holds
