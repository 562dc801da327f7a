"""Semantic segmentation data in the ADE20K layout, augmented with torchvision.transforms.v2.

`DIR/images/{training,validation}/*.jpg|png` and `DIR/annotations/{training,validation}/<same stem>.png`
(class index per pixel, 255 = ignore), optional `DIR/classes.txt` (one name per line). With
`reduce_zero_label` (ADE20K's "other" class 0), 0 becomes 255 and every other label drops by 1, as mmseg.
Samples are `(image, mask, index)`: a uint8 `tv_tensors.Image` and a `tv_tensors.Mask` of int64 labels
(after the transform), the augmentation seeded from (seed, epoch, index).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..preprocess import IGNORE_INDEX
from .folder import Batch, DataError, _sample_seed, seeded
from .images import IMG_EXTENSIONS, load_rgb

SPLITS = {"train": "training", "val": "validation"}


def read_classes(root: Path) -> list[str] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path} is empty: one class name per line")
    return names


class SegmentationFolder(Dataset):
    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None, seed: int = 0,
                 reduce_zero_label: bool = False) -> None:
        self.root = Path(root)
        sub = SPLITS.get(split, split)
        self.image_dir, self.ann_dir = self.root / "images" / sub, self.root / "annotations" / sub
        for d in (self.image_dir, self.ann_dir):
            if not d.is_dir():
                raise DataError(f"{d} not found: --data must hold images/{{training,validation}}/ and "
                                f"annotations/{{training,validation}}/ (the ADE20K layout)")
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not images:
            raise DataError(f"{self.image_dir} holds no images")
        missing = [p.name for p in images if not (self.ann_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise DataError(f"{self.ann_dir}: no annotation <stem>.png for {len(missing)} image(s), e.g. "
                            f"{missing[0]}")
        self.samples = [(p, self.ann_dir / f"{p.stem}.png") for p in images]
        self.transform, self.seed, self.reduce_zero_label = transform, seed, reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, index: int) -> str:
        return str(self.samples[index][0])

    def read_mask(self, index: int) -> np.ndarray:
        mask = np.asarray(Image.open(self.samples[index][1]))
        if mask.ndim != 2:
            raise DataError(f"{self.samples[index][1]}: an annotation must be a one-channel PNG of class indices")
        mask = mask.astype(np.int64)
        if mask.size and (mask.min() < 0 or mask.max() > IGNORE_INDEX):
            bad = int(mask.max()) if mask.max() > IGNORE_INDEX else int(mask.min())
            raise DataError(f"{self.samples[index][1]}: label {bad} (class indices are 0..{IGNORE_INDEX - 1}, "
                            f"{IGNORE_INDEX} = ignore)")
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
        return mask

    def max_label(self) -> int:
        """The largest class index in the annotations (ignore excluded); reads every mask."""
        top = -1
        for i in range(len(self)):
            m = self.read_mask(i)
            m = m[m != IGNORE_INDEX]
            top = max(top, int(m.max()) if m.size else -1)
        return top

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any, int]:
        from torchvision import tv_tensors

        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            img = load_rgb(self.samples[index][0])
            mask = self.read_mask(index)
        except Exception:  # noqa: BLE001 - a bad file is a bad sample, never a dead worker
            return None, None, index
        if mask.shape != (img.height, img.width):
            return None, None, index
        image = tv_tensors.Image(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())
        target = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transform is not None:
            image, target = seeded(self.transform, _sample_seed(self.seed, epoch, index), image, target)
        return image, target, index

    def unreadable_reason(self, index: int) -> str:
        try:
            img = load_rgb(self.samples[index][0])
            mask = self.read_mask(index)
        except Exception as e:  # noqa: BLE001
            return str(e).splitlines()[0][:200]
        if mask.shape != (img.height, img.width):
            return f"annotation {mask.shape[1]}x{mask.shape[0]} is not the image's size {img.width}x{img.height}"
        return "could not be read"


def segmentation_transform(train: bool, crop_size: int, mean, std, scale=(0.5, 2.0), hflip: float = 0.5,
                           photometric: float = 0.5) -> Callable:
    """Training (mmseg's ADE20K pipeline): resize the shorter side to crop_size x U(scale), random crop
    (padded with ignore), flip, photometric distortion. Evaluation (mmseg's test pipeline): the image resized
    to fit (4 x crop_size, crop_size) keeping its aspect, the mask left at the image's original size (the
    logits are resized back to it: the metric is computed at full resolution). Both end normalised (float
    image) with int64 masks."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    if not train:
        return EvalResize(crop_size, mean, std)
    steps = [v2.RandomResize(int(crop_size * scale[0]), int(crop_size * scale[1]) + 1),
             v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
             v2.RandomHorizontalFlip(hflip), v2.RandomPhotometricDistort(p=photometric)]
    dtypes = {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}
    return v2.Compose([*steps, v2.ToDtype(dtypes, scale=True), v2.Normalize(list(mean), list(std))])


class EvalResize:
    """mmseg's test-time `Resize(img_scale=(4 * size, size), keep_ratio=True)` (mmcv `imrescale`: the scale that
    fits the long side in 4 x size and the short side in size, sizes rounded half up; bilinear as cv2's, no
    antialias), then normalise; the mask is returned as it is (full resolution)."""

    def __init__(self, size: int, mean, std) -> None:
        self.size, self.mean, self.std = size, list(mean), list(std)

    def __call__(self, image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        h, w = image.shape[-2:]
        scale = min(4 * self.size / max(h, w), self.size / min(h, w))
        size = [int(h * scale + 0.5), int(w * scale + 0.5)]
        x = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False) if size != [h, w] else image
        x = F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
        return x, target


def collate_segmentation(items: list[tuple[Any, Any, int]], size_divisor: int = 32) -> Batch:
    """Images and masks padded to a multiple of 32 (images with 0, the mean after normalisation; masks with
    ignore, 255, so padding never counts). Samples of one size (training crops) are stacked into one
    tensor; samples of different sizes (whole validation images) stay a list of 1-image tensors, so each
    image is padded only to its own size and a prediction never depends on its batch-mates."""
    good = [b for b in items if b[0] is not None]
    bad = [b[2] for b in items if b[0] is None]
    if not good:
        return Batch(None, None, [], bad)
    if any(tuple(img.shape[-2:]) != tuple(mask.shape[-2:]) for img, mask, _ in good):  # evaluation: full-size masks
        return Batch([img[None] for img, _, _ in good], [torch.as_tensor(m)[None] for _, m, _ in good],
                     [b[2] for b in good], bad)
    padded = []
    for img, mask, _ in good:
        h, w = -(-img.shape[-2] // size_divisor) * size_divisor, -(-img.shape[-1] // size_divisor) * size_divisor
        x = img.new_zeros(img.shape[0], h, w)
        x[:, :img.shape[-2], :img.shape[-1]] = img
        m = torch.full((h, w), IGNORE_INDEX, dtype=torch.int64)
        m[:mask.shape[-2], :mask.shape[-1]] = mask
        padded.append((x, m))
    indices = [b[2] for b in good]
    if len({x.shape for x, _ in padded}) == 1:
        return Batch(torch.stack([x for x, _ in padded]), torch.stack([m for _, m in padded]), indices, bad)
    return Batch([x[None] for x, _ in padded], [m[None] for _, m in padded], indices, bad)
