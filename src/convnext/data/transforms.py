"""Train / eval transforms of the ConvNeXt recipe, built on torchvision.transforms.v2."""

from __future__ import annotations

import math
import re

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


def interpolation(name: str) -> InterpolationMode:
    if name not in _INTERP:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(_INTERP)}")
    return _INTERP[name]


class RandAugment(v2.RandAugment):
    """torchvision RandAugment with timm's magnitude noise (`mstd`): `rand-m9-mstd0.5`.

    timm scales magnitudes by m/10; torchvision by m/(num_magnitude_bins-1), so 11 bins make
    magnitude 9 mean the same strength. With `magnitude_std > 0` each call draws the magnitude
    from N(m, mstd), clipped to [0, 10], as timm does.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, magnitude_std: float = 0.0, **kwargs) -> None:
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11, **kwargs)
        self.mean_magnitude, self.magnitude_std = magnitude, magnitude_std

    def forward(self, *inputs):
        if self.magnitude_std > 0:
            m = self.mean_magnitude + self.magnitude_std * torch.randn(()).item()
            self.magnitude = int(round(min(10.0, max(0.0, m))))
        return super().forward(*inputs)


def parse_aa(spec: str, fill: tuple[int, int, int], interp: InterpolationMode = InterpolationMode.BICUBIC
             ) -> v2.Transform | None:
    """timm-style auto-augment spec -> transform: `rand-m9-mstd0.5-inc1`, `rand-n3-m10`, `trivial`, `none`
    (`interp`: of its rotations and shears; bicubic as timm's, bilinear on tensors, which have no bicubic)."""
    spec = spec.strip().lower()
    if spec in ("", "none", "off"):
        return None
    if spec == "trivial":
        return v2.TrivialAugmentWide(interpolation=interp, fill=list(fill))
    if spec.startswith("rand"):
        opts = {"n": 2.0, "m": 9.0, "mstd": 0.0}
        for part in spec.split("-")[1:]:
            m = re.fullmatch(r"(mstd|inc|n|m|w|mmax|p)([\d.]+)", part)
            if not m:
                raise ValueError(f"cannot parse auto-augment option {part!r} in {spec!r}")
            opts[m.group(1)] = float(m.group(2))
        # `inc1` (timm's increasing-severity ops) is what torchvision's op set already does.
        return RandAugment(num_ops=int(opts["n"]), magnitude=int(opts["m"]), magnitude_std=opts["mstd"],
                           interpolation=interp, fill=list(fill))
    raise ValueError(f"unknown auto-augment {spec!r}: use e.g. rand-m9-mstd0.5-inc1, trivial or none")


def train_transform(input_size: int, *, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                    aa: str = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4, reprob: float = 0.25,
                    interpolation_name: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    draft: bool = False, tensors: bool = False) -> v2.Compose:
    """RandomResizedCrop -> flip -> RandAugment (or color jitter if off) -> tensor -> normalize -> erase.

    `draft` (`--decode cpu-draft`): its crop also takes an undecoded JPEG and decodes it reduced (`data.decode`);
    `tensors` (`gpu`): for uint8 image tensors on any device (RandAugment's rotations and shears bilinear:
    torchvision has no bicubic for them on tensors)."""
    from .decode import DraftRandomResizedCrop

    fill = tuple(round(255 * m) for m in mean)
    crop = DraftRandomResizedCrop if draft else v2.RandomResizedCrop
    ops: list = [crop(input_size, scale=scale, interpolation=interpolation(interpolation_name), antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    auto = parse_aa(aa, fill, InterpolationMode.BILINEAR if tensors else InterpolationMode.BICUBIC)
    if auto is not None:
        ops.append(auto)  # timm disables color jitter when an auto-augment policy is on
    elif color_jitter > 0:
        ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if reprob > 0:
        ops.append(v2.RandomErasing(p=reprob, value="random"))  # timm's "pixel" mode: per-pixel normal noise
    return v2.Compose(ops)


def eval_transform(pre: Preprocess, normalize: bool = True) -> v2.Compose:
    """timm's eval transform (`transforms_imagenet_eval`): resize to input/crop_pct, the shorter side
    ("center") or both sides ("squash"), center-crop to input_size, to tensor, normalise.

    `normalize=False` stops at the uint8 tensor: `normalize_batch` then does the rest on a whole batch on its
    device (the same arithmetic, bitwise), a quarter of the bytes to move and no per-image float work."""
    interp, size = interpolation(pre.interpolation), pre.input_size
    scale = math.floor(size / pre.crop_pct)
    resize = (scale, scale) if pre.crop_mode == "squash" else scale
    ops = [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(size), v2.PILToTensor()]
    if not normalize:
        return v2.Compose(ops)
    return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def normalize_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32, as `v2.ToDtype(scale=True)` + `v2.Normalize` compute it per image
    (`mean`, `std`: (C, 1, 1) float32 tensors on the images' device)."""
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def mixup_cutmix(num_classes: int, *, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0) -> v2.Transform | None:
    """Batch Mixup / CutMix (timm `mode=batch`): one of them per batch, CutMix with `switch_prob`.

    Targets become probability vectors; label smoothing is applied by the loss
    (`CrossEntropyLoss(label_smoothing=...)` on soft targets equals timm's smoothed mixup targets).
    """
    choices, p = [], []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        p.append(1 - switch_prob if cutmix > 0 else 1.0)
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        p.append(switch_prob if mixup > 0 else 1.0)
    if not choices or prob <= 0:
        return None
    t = choices[0] if len(choices) == 1 else v2.RandomChoice(choices, p=p)
    return t if prob >= 1 else v2.RandomApply([t], p=prob)
