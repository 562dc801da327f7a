"""How images are prepared for a model: the one record shared by weights, training, evaluation and export."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
CROP_MODES = ("center", "squash")
DECODE_MODES = ("cpu", "cpu-draft", "gpu")  # where training images are decoded (`data.decode`)
IGNORE_INDEX = 255  # the label of pixels that count in no loss and no metric (segmentation masks, mmseg's)


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing, as timm's eval transform: `crop_mode` "center" resizes the shorter side to
    input_size / crop_pct and center-crops; "squash" resizes to input_size / crop_pct square (no aspect kept),
    then center-crops (nothing at crop_pct 1).

    Without a `crop_mode`, the official ConvNeXt rule: at input_size >= 384 (how the official 384 fine-tunes
    are evaluated) "squash" to the square with no crop (crop_pct 1), below "center".
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        except (TypeError, ValueError):
            raise ValueError(f"mean and std must be lists of numbers, got {self.mean!r}, {self.std!r}") from None
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if not (isinstance(self.input_size, int) and not isinstance(self.input_size, bool) and self.input_size >= 1):
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        if self.crop_mode is None and self.input_size >= 384:  # the official rule: the square, no crop
            object.__setattr__(self, "crop_mode", "squash")
            object.__setattr__(self, "crop_pct", 1.0)
        elif self.crop_mode is None:
            object.__setattr__(self, "crop_mode", "center")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode {self.crop_mode!r}; choose one of {', '.join(CROP_MODES)}")
        if not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if len(self.mean) != len(self.std) or not self.mean or any(not math.isfinite(v) for v in self.mean) \
                or any(not (math.isfinite(s) and s > 0) for s in self.std):
            raise ValueError(f"mean and std must be finite, as many of each, std > 0; got {self.mean}, {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for mean/std)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """The record's own keys from `d` (other keys are ignored); missing keys take the defaults."""
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocessing must be a mapping of its fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
