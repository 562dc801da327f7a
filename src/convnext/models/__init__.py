"""Model definitions (torch only): the textbook ConvNeXt (`convnext`), its fast exact kernels (`fast`)."""

from .convnext import (
    MODELS,
    Block,
    ConvNeXt,
    ConvNeXtConfig,
    ConvNeXtIsotropic,
    ConvNeXtIsotropicConfig,
    FeatureInfo,
    Head,
    Stage,
)
from .layers import GRN, DropPath, LayerNorm, LayerNorm2d

__all__ = [
    "Block", "ConvNeXt", "ConvNeXtConfig", "ConvNeXtIsotropic", "ConvNeXtIsotropicConfig",
    "DropPath", "FeatureInfo", "GRN", "Head", "LayerNorm", "LayerNorm2d", "MODELS", "Stage",
]
