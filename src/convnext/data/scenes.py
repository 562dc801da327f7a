"""Detection and segmentation scenes made from what ships with the package, deterministic by seed.

Fashion-MNIST garments (their pixels give exact instance masks) are tinted, scaled and pasted at random
positions, with overlaps, onto crops of real photographs (`data/photos/`, public domain and CC0, see
its README). Training scenes use the Fashion-MNIST training garments, validation scenes the test-set
garments, so every validation object is unseen. Written in the layouts the commands read:

- detection (COCO): `ROOT/{train,val}/NNNNNN.jpg`, `ROOT/annotations/instances_{train,val}.json`
  (boxes [x, y, w, h], RLE masks, area, iscrowd 0; categories 1..10 = the garment classes);
- segmentation (ADE20K): `ROOT/images/{training,validation}/NNNNNN.jpg`,
  `ROOT/annotations/{training,validation}/NNNNNN.png` (0 = background, 1..10 = garments), `ROOT/classes.txt`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .fashion_mnist import CLASSES, read_idx, source_dir
from .folder import write_once

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TASKS = ("detect", "segment")


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn: image side range, objects per scene, garment size range (pixels), and
    which garment classes (0..9; None: all ten)."""

    min_side: int = 160
    max_side: int = 256
    min_objects: int = 1
    max_objects: int = 4
    min_garment: int = 40
    max_garment: int = 112
    classes: tuple[int, ...] | None = None


def _photos() -> list[np.ndarray]:
    folder = resources.files("convnext").joinpath("data", "photos")
    return [np.asarray(Image.open(folder.joinpath(f"{p}.jpg")).convert("RGB")) for p in PHOTOS]


def _garments(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    src = source_dir()
    images, labels = read_idx(src / f"{prefix}-images-idx3-ubyte.gz", src / f"{prefix}-labels-idx1-ubyte.gz")
    return np.frombuffer(b"".join(images), np.uint8).reshape(-1, 28, 28), np.asarray(labels, np.int64)


def _background(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    frac = rng.uniform(0.4, 1.0)
    ch, cw = max(16, int(ph * frac)), max(16, int(pw * frac))
    y, x = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
    out = np.asarray(crop, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out * rng.uniform(0.7, 1.2)


def draw_scene(rng: np.random.Generator, photos: list[np.ndarray], garments: np.ndarray, labels: np.ndarray,
               spec: SceneSpec = SceneSpec()) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: (H, W, 3) uint8 image, [(class 0..9, visible (H, W) bool mask)] in paint order."""
    h, w = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, 2))
    img = _background(rng, photos, h, w)
    owner = np.full((h, w), -1, np.int64)  # which object each pixel shows
    objects: list[int] = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        k = int(rng.integers(len(garments)))
        side = int(rng.integers(spec.min_garment, min(spec.max_garment, h, w) + 1))
        glyph = np.asarray(Image.fromarray(garments[k]).resize((side, side), Image.BILINEAR), np.float32) / 255
        mask = glyph > 0.12
        if mask.sum() < 16:
            continue
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        if (owner[y:y + side, x:x + side][mask] >= 0).mean() > 0.4:  # would hide too much of another
            continue
        color = rng.uniform(0, 255, 3) * rng.uniform(0.6, 1.0)
        shade = (0.35 + 0.65 * glyph)[..., None] * color
        region = img[y:y + side, x:x + side]
        region[mask] = shade[mask]
        owner[y:y + side, x:x + side][mask] = len(objects)
        objects.append(int(labels[k]))
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    visible = [(c, owner == i) for i, c in enumerate(objects)]
    return img, [(c, m) for c, m in visible if m.sum() >= 16]


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def write_scenes(root: str | os.PathLike, task: str, *, n_train: int = 2000, n_val: int = 500, seed: int = 0,
                 spec: SceneSpec = SceneSpec()) -> Path:
    """Write `n_train` + `n_val` scenes for `task` ("detect" or "segment") under `root` (once) and return it."""
    from pycocotools import mask as mask_utils

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    marker = json.dumps({"task": task, "n_train": n_train, "n_val": n_val, "seed": seed, "spec": spec.__dict__})

    def build(tmp: Path) -> None:
        photos = _photos()
        categories = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
        for split, n, split_seed in (("train", n_train, 0), ("val", n_val, 1)):
            garments, labels = _garments(split)
            if spec.classes is not None:
                keep = np.isin(labels, spec.classes)
                garments, labels = garments[keep], labels[keep]
            ade = "training" if split == "train" else "validation"
            img_dir = tmp / (split if task == "detect" else f"images/{ade}")
            img_dir.mkdir(parents=True)
            if task == "segment":
                (tmp / "annotations" / ade).mkdir(parents=True)
            images, anns = [], []
            for i in range(n):
                rng = np.random.default_rng([seed, split_seed, i])
                img, objects = draw_scene(rng, photos, garments, labels, spec)
                name = f"{i:06d}.jpg"
                Image.fromarray(img).save(img_dir / name, quality=95)
                h, w = img.shape[:2]
                if task == "segment":
                    sem = np.zeros((h, w), np.uint8)
                    for c, m in objects:
                        sem[m] = c + 1
                    Image.fromarray(sem).save(tmp / "annotations" / ade / f"{i:06d}.png")
                    continue
                images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
                for c, m in objects:
                    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": _box(m),
                                 "area": float(m.sum()), "iscrowd": 0,
                                 "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
            if task == "detect":
                (tmp / "annotations").mkdir(exist_ok=True)
                (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(
                    {"images": images, "annotations": anns, "categories": categories}))
        if task == "segment":
            (tmp / "classes.txt").write_text("\n".join(["background", *CLASSES]) + "\n")
        (tmp / "LICENSE").write_text("Garments: Fashion-MNIST, Copyright 2017 Zalando SE, MIT licence. Backgrounds: "
                                     "scikit-image sample photographs (public domain / CC0), see convnext/data/photos.\n")

    return write_once(root, marker, build)
