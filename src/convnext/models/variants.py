"""Every registered architecture: name -> (model class, config). Read-only data."""

from __future__ import annotations

from .convnext import ConvNeXt, ConvNeXtConfig, ConvNeXtIsotropic, ConvNeXtIsotropicConfig


def _v1(depths, dims):
    return ConvNeXt, ConvNeXtConfig(depths=depths, dims=dims)


def _v2(depths, dims):
    # V2: GRN after the MLP's GELU, and no LayerScale (GRN makes it redundant, paper section 3).
    return ConvNeXt, ConvNeXtConfig(depths=depths, dims=dims, use_grn=True, ls_init_value=None)


def _iso(depth, dim, ls_init_value=None):
    return ConvNeXtIsotropic, ConvNeXtIsotropicConfig(depth=depth, dim=dim, ls_init_value=ls_init_value)


_SMALL = (2, 2, 6, 2)  # atto/femto/pico (timm's small ConvNeXts and V2's)
_NANO = (2, 2, 8, 2)
_TINY = (3, 3, 9, 3)
_DEEP = (3, 3, 27, 3)

MODELS: dict[str, tuple[type, ConvNeXtConfig | ConvNeXtIsotropicConfig]] = {
    "convnext_atto": _v1(_SMALL, (40, 80, 160, 320)),
    "convnext_femto": _v1(_SMALL, (48, 96, 192, 384)),
    "convnext_pico": _v1(_SMALL, (64, 128, 256, 512)),
    "convnext_nano": _v1(_NANO, (80, 160, 320, 640)),
    "convnext_tiny": _v1(_TINY, (96, 192, 384, 768)),
    "convnext_small": _v1(_DEEP, (96, 192, 384, 768)),
    "convnext_base": _v1(_DEEP, (128, 256, 512, 1024)),
    "convnext_large": _v1(_DEEP, (192, 384, 768, 1536)),
    "convnext_xlarge": _v1(_DEEP, (256, 512, 1024, 2048)),
    "convnextv2_atto": _v2(_SMALL, (40, 80, 160, 320)),
    "convnextv2_femto": _v2(_SMALL, (48, 96, 192, 384)),
    "convnextv2_pico": _v2(_SMALL, (64, 128, 256, 512)),
    "convnextv2_nano": _v2(_NANO, (80, 160, 320, 640)),
    "convnextv2_tiny": _v2(_TINY, (96, 192, 384, 768)),
    "convnextv2_small": _v2(_DEEP, (96, 192, 384, 768)),  # timm only, no official weights
    "convnextv2_base": _v2(_DEEP, (128, 256, 512, 1024)),
    "convnextv2_large": _v2(_DEEP, (192, 384, 768, 1536)),
    "convnextv2_huge": _v2(_DEEP, (352, 704, 1408, 2816)),
    # Official isotropic models: LayerScale off for S/B, 1e-6 for L (TRAINING.md).
    "convnext_isotropic_small": _iso(18, 384),
    "convnext_isotropic_base": _iso(18, 768),
    "convnext_isotropic_large": _iso(36, 1024, ls_init_value=1e-6),
}
