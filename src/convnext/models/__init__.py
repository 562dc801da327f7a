"""Model definitions (torch only)."""

from .convnext import (
    Block,
    ConvNeXt,
    ConvNeXtConfig,
    ConvNeXtIsotropic,
    ConvNeXtIsotropicConfig,
    FeatureInfo,
    Stage,
)
from .layers import GRN, DropPath, LayerNorm, LayerNorm2d
from .variants import MODELS

__all__ = [
    "Block", "ConvNeXt", "ConvNeXtConfig", "ConvNeXtIsotropic", "ConvNeXtIsotropicConfig",
    "DropPath", "FeatureInfo", "GRN", "LayerNorm", "LayerNorm2d", "MODELS", "Stage",
]
