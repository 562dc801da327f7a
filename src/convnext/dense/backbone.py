"""ConvNeXt as the backbone of dense prediction: the stages, the per-level LayerNorm of the official
det/seg backbones (`norm0..norm3`), and torchvision's FPN on top for the detectors.

The official detection and segmentation backbones (`object_detection/mmdet/models/backbones/convnext.py`)
are the classification network without its head, with a channels-first LayerNorm after every output
stage; their checkpoints (mmcv: `{"state_dict": ..., "meta": ...}`) name these `backbone.norm{i}` and the
stages in the official classification layout under `backbone.`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..factory import create_model
from ..models.layers import LayerNorm2d

logger = logging.getLogger(__name__)

class ConvNeXtBackbone(nn.Module):
    """ConvNeXt stages -> [LayerNorm2d(stage output) for each level]: strides 4, 8, 16, 32.

    `frozen_stages`: -1 trains everything, 0 freezes the stem, k >= 1 the stem and the first k stages
    (the mmdet convention). `pretrained`: any checkpoint `create_model` loads (the norms then start at
    identity, as the official code does), or an official det/seg checkpoint (`backbone.*`, norms included).
    """

    def __init__(self, name: str, *, pretrained: bool | str | os.PathLike | None = None, drop_path_rate: float = 0.0,
                 frozen_stages: int = -1, out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        is_file = isinstance(pretrained, (str, os.PathLike)) and os.path.exists(pretrained)
        dense = _read_dense_checkpoint(pretrained) if is_file else None  # else: a weight tag, or True
        body_weights = dense["body"] if dense else (pretrained or False)
        self.body = create_model(name, pretrained=body_weights, features_only=True, out_indices=out_indices,
                                 drop_path_rate=drop_path_rate)
        self.out_indices = self.body.out_indices
        self.channels = [self.body.cfg.dims[i] for i in self.out_indices]
        self.strides = [self.body.cfg.patch_size * 2 ** i for i in self.out_indices]
        for i, c in zip(self.out_indices, self.channels, strict=True):
            self.add_module(f"norm{i}", LayerNorm2d(c, eps=1e-6))
        if dense:
            missing = [f"norm{i}.{p}" for i in self.out_indices for p in ("weight", "bias")
                       if f"norm{i}.{p}" not in dense["norms"]]
            if missing:
                raise ValueError(f"{pretrained}: a det/seg checkpoint without {', '.join(missing)}")
            self.load_state_dict({f"norm{i}.{p}": dense["norms"][f"norm{i}.{p}"] for i in self.out_indices
                                  for p in ("weight", "bias")}, strict=False)
            logger.info("loaded the backbone of %s (%d neck/head tensors not used)", pretrained, dense["unused"])
        self.frozen_stages = frozen_stages
        self._freeze()

    def _freeze(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.body.stem, *list(self.body.stages)[:self.frozen_stages]]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return [getattr(self, f"norm{i}")(f) for i, f in zip(self.out_indices, feats, strict=True)]


class ConvNeXtFPN(nn.Module):
    """`ConvNeXtBackbone` + `torchvision.ops.FeaturePyramidNetwork`: what torchvision's detectors take.

    Returns an OrderedDict of 256-channel maps ("0".."3" at strides 4..32, then "pool", a max-pooled
    extra level, as torchvision's ResNet-FPN backbones); `extra="p6p7"` adds RetinaNet/FCOS's P6, P7
    (stride 64, 128) from P5 instead.
    """

    def __init__(self, name: str, *, out_channels: int = 256, extra: str = "pool", returned_levels=(0, 1, 2, 3),
                 **backbone_kw: Any) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import (FeaturePyramidNetwork, LastLevelMaxPool,
                                                             LastLevelP6P7)

        self.backbone = ConvNeXtBackbone(name, out_indices=tuple(returned_levels), **backbone_kw)
        extra_block = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(self.backbone.channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.backbone(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _read_dense_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """An official det/seg checkpoint -> {"body": our state dict, "norms": {...}, "unused": n}; None if
    `path` is an ordinary (classification) checkpoint."""
    from ..weights import read_checkpoint, to_ours

    obj, _ = read_checkpoint(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(sd, Mapping) or not any(str(k).startswith("backbone.") for k in sd):
        return None
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    norms = {k: v for k, v in backbone.items() if k.split(".")[0] in {f"norm{i}" for i in range(4)}}
    body = {k: v for k, v in backbone.items() if k not in norms}
    _, ours = to_ours(body, "official")
    return {"body": ours, "norms": norms, "unused": len(sd) - len(backbone)}


def official_state_dict(backbone: ConvNeXtBackbone, rest: Mapping[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Our backbone's weights in the official det/seg checkpoint layout (`backbone.` + official names +
    `backbone.norm{i}`), plus `rest` (e.g. neck and head tensors) as they are."""
    from ..weights import from_ours

    body = from_ours(backbone.body.state_dict(), "official")
    out = {f"backbone.{k}": v for k, v in body.items()}
    for i in backbone.out_indices:
        norm = getattr(backbone, f"norm{i}")
        out[f"backbone.norm{i}.weight"], out[f"backbone.norm{i}.bias"] = norm.weight.detach(), norm.bias.detach()
    return out | dict(rest or {})
