"""How images are prepared for a model: the one record shared by weights, training, evaluation and export."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
IGNORE_INDEX = 255  # the label of pixels that count in no loss and no metric (segmentation masks, mmseg's)


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing: resize the shorter side to input_size / crop_pct, center-crop, normalise.

    At input_size >= 384 the image is resized to the square without cropping (the official 384
    fine-tunes' evaluation).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

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
