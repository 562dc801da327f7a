"""Detection data in COCO format, checked once when loaded, augmented with torchvision.transforms.v2.

`CocoDetection(ann_file, image_dir)` reads an `instances_*.json` (boxes [x, y, w, h], polygon or RLE
masks, `iscrowd`, category ids that need not be contiguous: they map to labels 1..K and back through
`cat_ids`). Problems are found before training starts, not mid-epoch: an unknown category or a missing
image file is a `DataError` naming it; a box outside the image is clipped, and a box with no area left,
or a mask whose size is not the image's, is skipped and reported in one warning line.
Samples are `(image, target, index)` with `target` = {"boxes": BoundingBoxes (XYXY), "labels",
"masks": Mask (N, H, W), "image_id"}, the augmentation seeded from (seed, epoch, index).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .folder import Batch, DataError, _sample_seed, seeded
from .images import load_rgb

logger = logging.getLogger(__name__)


def require_pycocotools():
    try:
        from pycocotools import mask as mask_utils  # noqa: F401
    except ImportError:
        raise DataError("COCO masks and metrics need pycocotools: pip install 'convnext[dense]'") from None
    return mask_utils


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a COCO annotation file ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no {key!r} list; expected COCO instances JSON (images, annotations, categories)")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entries(path: Path, data: dict[str, Any]) -> None:
    """Every image and category entry well formed, their ids unique: one line naming the entry otherwise."""
    seen: set[int] = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise DataError(f"{path}: images[{i}] has no integer 'id'")
        for key in ("file_name", "width", "height"):
            ok = isinstance(im.get(key), str) if key == "file_name" else _is_int(im.get(key)) and im[key] > 0
            if not ok:
                raise DataError(f"{path}: image {im['id']} has no valid {key!r} (got {im.get(key)!r}; "
                                f"{'a file name' if key == 'file_name' else 'a positive integer'})")
        if im["id"] in seen:
            raise DataError(f"{path}: image id {im['id']} appears twice in 'images' (ids must be unique)")
        seen.add(im["id"])
    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{path}: categories[{i}] has no integer 'id'")
        if cat["id"] in cat_ids:
            raise DataError(f"{path}: category id {cat['id']} appears twice in 'categories' (ids must be unique)")
        cat_ids.add(cat["id"])
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object")
        box = a.get("bbox")
        if isinstance(box, list) and any(isinstance(v, float) and not math.isfinite(v) for v in box):
            raise DataError(f"{path}: annotation {a.get('id', i)} (image {a.get('image_id')}) has a non-finite bbox "
                            f"{box}")


def _unusable(a: dict, im: dict, path: Path) -> str | None:
    """Why an annotation cannot be used (None if it can): said in one warning line, the annotation skipped."""
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return "without a [x, y, w, h] bbox"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return "with a zero-area box"
    if min(float(im["width"]), x + w) - max(0.0, x) <= 0 or min(float(im["height"]), y + h) - max(0.0, y) <= 0:
        return "with a box outside the image"
    seg = a.get("segmentation")
    if isinstance(seg, list) and seg and not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                                 and all(isinstance(v, (int, float)) for v in p) for p in seg):
        return "with a polygon of fewer than 3 points"
    if isinstance(seg, dict):
        if list(seg.get("size", [])) != [im["height"], im["width"]]:
            return "with a mask of the wrong size"
        if not _rle_decodes(seg, im["height"], im["width"]):
            return "with an unreadable RLE mask"
    return None


def _rle_counts(s: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`, transcribed), or None when
    the string is not one (pycocotools decodes garbage without a word, into whatever memory holds)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                return None
            ch = ord(s[p]) - 48
            if not 0 <= ch < 64:
                return None
            x |= (ch & 0x1F) << 5 * k
            more = bool(ch & 0x20)
            p, k = p + 1, k + 1
            if not more and ch & 0x10:
                x |= -1 << 5 * k
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _rle_decodes(seg: dict, h: int, w: int) -> bool:
    """An RLE mask whose run lengths are non-negative and cover exactly the h x w image."""
    counts = seg.get("counts")
    if isinstance(counts, str):
        counts = _rle_counts(counts)
    if not (isinstance(counts, list) and counts and all(_is_int(v) and v >= 0 for v in counts)):
        return False
    return sum(counts) == h * w


class CocoDetection(Dataset):
    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, transform: Callable | None = None,
                 seed: int = 0, masks: bool = True, cat_ids: list[int] | None = None) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.transform, self.seed, self.with_masks = transform, seed, masks
        data = _read_json(self.ann_file)
        _check_entries(self.ann_file, data)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [int(c["id"]) for c in cats] if cat_ids is None else list(cat_ids)
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        self.classes = [names.get(i, str(i)) for i in self.cat_ids]
        label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        self.images = sorted(data["images"], key=lambda im: im["id"])
        for im in self.images:
            if not (self.image_dir / im["file_name"]).is_file():
                raise DataError(f"{self.ann_file}: image {im['id']} file not found: {self.image_dir / im['file_name']}")
        by_id = {im["id"]: im for im in self.images}
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        skipped: Counter[str] = Counter()
        for a in data["annotations"]:
            if a.get("category_id") not in label_of:
                raise DataError(f"{self.ann_file}: annotation {a.get('id')} has category_id {a.get('category_id')}, "
                                f"not among the categories {self.cat_ids}")
            im = by_id.get(a.get("image_id"))
            if im is None:
                raise DataError(f"{self.ann_file}: annotation {a.get('id')} refers to image_id {a.get('image_id')}, "
                                f"which is not in 'images'")
            why = _unusable(a, im, self.ann_file)
            if why:
                skipped[why] += 1
                continue
            x, y, w, h = a["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
            self.anns[im["id"]].append({**a, "label": label_of[a["category_id"]], "xyxy": [x0, y0, x1, y1]})
        self.skipped = dict(skipped)
        if skipped:
            logger.warning("%s: skipped %d annotation(s): %s", self.ann_file, sum(skipped.values()),
                           ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))

    def __len__(self) -> int:
        return len(self.images)

    def label_to_cat(self, label: int) -> int:
        return self.cat_ids[label - 1]

    def sample_name(self, index: int) -> str:
        return str(self.image_dir / self.images[index]["file_name"])

    def _masks(self, anns: list[dict], h: int, w: int) -> np.ndarray:
        mask_utils = require_pycocotools()
        out = np.zeros((len(anns), h, w), np.uint8)
        for i, a in enumerate(anns):
            seg = a.get("segmentation")
            if isinstance(seg, list) and seg:  # polygons
                out[i] = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
            elif isinstance(seg, dict):  # RLE, compressed or not
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
                out[i] = mask_utils.decode(rle)
            else:  # no mask given: the box
                x0, y0, x1, y1 = (int(round(v)) for v in a["xyxy"])
                out[i, y0:y1, x0:x1] = 1
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, dict | None, int]:
        from torchvision import tv_tensors

        epoch, index = key if isinstance(key, tuple) else (0, key)
        im = self.images[index]
        try:
            img = load_rgb(self.image_dir / im["file_name"])
        except Exception:  # noqa: BLE001 - an undecodable file is a bad sample, never a dead worker
            return None, None, index
        h, w = img.height, img.width
        anns = [a for a in self.anns[im["id"]] if not a.get("iscrowd", 0)]
        if (h, w) != (im["height"], im["width"]):
            return None, None, index
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor([a["xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4), format="XYXY",
                canvas_size=(h, w)),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "image_id": int(im["id"]),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(self._masks(anns, h, w)))
        image = tv_tensors.Image(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            image, target = seeded(self.transform, _sample_seed(self.seed, epoch, index), image, target)
        return image, target, index

    def coco_gt(self):
        """A pycocotools COCO of the annotations in use (skipped ones left out, crowds kept for COCOeval)."""
        require_pycocotools()
        import contextlib
        import io

        from pycocotools.coco import COCO

        anns = []
        for im in self.images:
            for a in self.anns[im["id"]]:
                x0, y0, x1, y1 = a["xyxy"]
                anns.append({k: v for k, v in a.items() if k not in ("label", "xyxy")}
                            | {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": a.get("area", (x1 - x0) * (y1 - y0))})
        coco = COCO()
        coco.dataset = {"images": self.images, "annotations": anns,
                        "categories": [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.classes, strict=True)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


CROP_POLICIES = ("iou", "detr")


def detection_transform(train: bool, hflip: float = 0.5, crop: float = 0.5, photometric: float = 0.5,
                        crop_policy: str = "iou", input_size: int = 800) -> Callable:
    """uint8 image + target -> float image in [0, 1] + target; in training: photometric distortion, a random
    crop with probability `crop` (boxes clipped, emptied ones removed with their masks), flips.
    Resizing is the detector's own (torchvision's `min_size`/`max_size`; several min sizes = multi-scale).

    `crop_policy`: "iou" (torchvision's IoU-constrained `RandomIoUCrop`, SSD's) or "detr" (the official ConvNeXt
    COCO configs' AutoAugment policy, from DETR: resize the shorter side to 400, 500 or 600 (longer <= 1333),
    crop a random 384-600 x 384-600 window, leave the final resize to the detector's multi-scale; the sizes scale
    with `input_size` / 800)."""
    if crop_policy not in CROP_POLICIES:
        raise ValueError(f"crop_policy must be one of {', '.join(CROP_POLICIES)}, got {crop_policy!r}")
    steps = []
    if train:
        if crop_policy == "detr":
            k = input_size / 800
            cropper = v2.Compose([v2.RandomShortestSize([round(s * k) for s in (400, 500, 600)], round(1333 * k)),
                                  RandomRangeCrop(round(384 * k), round(600 * k))])
        else:
            cropper = v2.RandomIoUCrop()
        steps = [v2.RandomPhotometricDistort(p=photometric), v2.RandomApply([cropper], p=crop),
                 v2.RandomHorizontalFlip(hflip), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


class RandomRangeCrop(v2.RandomCrop):
    """mmdet `RandomCrop(crop_type="absolute_range", crop_size=(lo, hi), allow_negative_crop=True)`: a window whose
    height and width are each uniform in [min(side, lo), min(side, hi)], at a uniform position (a crop with no box
    left is kept)."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(size=(lo, lo))
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        from torchvision.transforms.v2._utils import query_size

        h, w = query_size(flat_inputs)
        ch = int(torch.randint(min(h, self.lo), min(h, self.hi) + 1, ()))
        cw = int(torch.randint(min(w, self.lo), min(w, self.hi) + 1, ()))
        top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
        return dict(needs_crop=True, top=top, left=left, height=ch, width=cw, needs_pad=False, padding=[0, 0, 0, 0])


def collate_detection(items: list[tuple[Any, dict | None, int]]) -> Batch:
    """A list of images and a list of target dicts (torchvision's detection models take lists)."""
    good = [b for b in items if b[0] is not None]
    return Batch([b[0] for b in good] if good else None, [b[1] for b in good], [b[2] for b in good],
                 [b[2] for b in items if b[0] is None])
