"""Semantic segmentation on a ConvNeXt backbone: UperNet as the official ADE20K configs use it
(mmseg `UPerHead` + `FCNHead` auxiliary), or a light FPN head.

UperNet (Xiao et al. 2018): a pyramid pooling module (PPM, pool scales 1, 2, 3, 6) on the last level,
lateral 1x1 convs to 512 channels, a top-down pathway with 3x3 convs (the FPN), every level upsampled
to stride 4 and concatenated, a 3x3 fusion conv, dropout 0.1 and a 1x1 classifier. The auxiliary FCN
head (one 3x3 conv of 256 channels on stage 3, dropout 0.1) adds 0.4 x its cross-entropy in training.
Convolutions are conv + BatchNorm + ReLU (SyncBN in the official configs: BatchNorm is converted to
SyncBatchNorm when training on several processes: `train.distributed.sync_batchnorm`). Logits are upsampled to the input size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import IGNORE_INDEX
from .backbone import ConvNeXtBackbone

HEADS = ("upernet", "fpn")


def conv_bn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PPM(nn.Module):
    """Pyramid pooling: the map, and its average pools at each scale (conv'd, upsampled back)."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels)) for s in scales)
        self.bottleneck = conv_bn_relu(cin + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *(_resize(p(x), x.shape[-2:]) for p in self.pools)], 1))


class UPerHead(nn.Module):
    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PPM(in_channels[-1], channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [lat(f) for lat, f in zip(self.lateral, feats, strict=False)] + [self.ppm(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1], strict=False)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], 1))
        return self.cls(self.dropout(fused))


class FPNHead(nn.Module):
    """Light head (Panoptic-FPN style): 1x1 laterals + top-down sum, each level to stride 4, summed."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels)
        self.smooth = conv_bn_relu(channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])
        for lat, f in zip(self.lateral[-2::-1], feats[-2::-1], strict=False):
            x = lat(f) + _resize(x, f.shape[-2:])
        return self.cls(self.dropout(self.smooth(x)))


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv (256) + dropout + 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """backbone -> decode head (+ auxiliary head in training) -> logits at the input size.

    `model(images)` returns (N, num_classes, H, W) logits; `model(images, masks)` the named losses, as
    torchvision's detectors do (cross-entropy with ignore_index 255; `loss_aux` weighted 0.4 when there
    is an auxiliary head). `dropout`: the heads' Dropout2d before their classifiers (0.1 as published).
    """

    def __init__(self, backbone: ConvNeXtBackbone, num_classes: int, head: str = "upernet", aux_head: bool = True,
                 aux_weight: float = 0.4, channels: int | None = None, dropout: float = 0.1,
                 test_mode: str = "whole", crop_size: int = 512, stride: int = 341) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if test_mode not in ("whole", "slide") or not (0 < stride <= crop_size):
            raise ValueError(f"test_mode must be whole or slide (with 0 < stride <= crop_size), got {test_mode!r}, "
                             f"crop {crop_size}, stride {stride}")
        self.test_mode, self.crop_size, self.stride = test_mode, crop_size, stride
        self.backbone = backbone
        self.num_classes = num_classes
        width = {"dropout": dropout} if channels is None else {"channels": channels, "dropout": dropout}
        self.decode_head = (UPerHead if head == "upernet" else FPNHead)(backbone.channels, num_classes, **width)
        aux_width = {"dropout": dropout} if channels is None else {"channels": max(channels // 2, 16), "dropout": dropout}
        self.aux_head = FCNHead(backbone.channels[2], num_classes, **aux_width) if aux_head else None
        self.aux_weight = aux_weight

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        if target is None:
            return self.slide(x) if self.test_mode == "slide" else self.whole(x)
        feats = self.backbone(x)
        out = {"loss_seg": F.cross_entropy(_resize(self.decode_head(feats), x.shape[-2:]).float(), target,
                                           ignore_index=IGNORE_INDEX)}
        if self.aux_head is not None:
            aux = _resize(self.aux_head(feats[2]), x.shape[-2:]).float()
            out["loss_aux"] = self.aux_weight * F.cross_entropy(aux, target, ignore_index=IGNORE_INDEX)
        return out


    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the whole image at its size (mmseg's `whole_inference`)."""
        return _resize(self.decode_head(self.backbone(x)), x.shape[-2:])

    def slide(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from overlapping `crop_size` windows `stride` apart, the last flush with the far edge, averaged
        where they overlap (mmseg's `slide_inference`, how the official single-scale numbers are measured)."""
        crop, step = self.crop_size, self.stride
        n, _, h, w = x.shape
        rows, cols = (max(size - crop + step - 1, 0) // step + 1 for size in (h, w))
        out, count = x.new_zeros((n, self.num_classes, h, w)), x.new_zeros((1, 1, h, w))
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * step + crop, h), min(c * step + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                out[:, :, y1:y2, x1:x2] += self.whole(x[:, :, y1:y2, x1:x2]).to(out.dtype)
                count[:, :, y1:y2, x1:x2] += 1
        return out / count


def create_segmenter(name: str, num_classes: int, *, head: str = "upernet",
                     pretrained: bool | str | os.PathLike | None = None, aux_head: bool = True,
                     drop_path_rate: float = 0.0, frozen_stages: int = -1, **kw: Any) -> Segmenter:
    """UperNet (or a light FPN head) on a ConvNeXt backbone; see `Segmenter`. `channels`: the decode head's
    width (UperNet 512 as published, the FPN head 128; the auxiliary head gets half).

    `pretrained`: a classification or det/seg checkpoint initialises the backbone; an official UperNet file
    (`upernet_convnext_*_ade20k.pth`, mmseg layout) loads whole, every tensor (BN statistics too); with
    another `num_classes` all but the two classifier convs, which start afresh (said in the log)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    from .io import load_whole, read_official

    whole = read_official(pretrained, name, "segment") if head == "upernet" else None
    backbone = ConvNeXtBackbone(name, pretrained=None if whole else pretrained, drop_path_rate=drop_path_rate,
                                frozen_stages=frozen_stages)
    model = Segmenter(backbone, num_classes, head=head, aux_head=aux_head, **kw)
    if whole is not None:
        load_whole(model, whole, pretrained, "UperNet", ("decode_head.cls.", "aux_head.cls."), num_classes)
    return model


def segmenter_from_spec(spec: dict[str, Any], **backbone: Any) -> Segmenter:
    """The segmenter a file's spec describes (`SegmentationTask.spec`); `backbone`: pretrained, drop_path_rate,
    frozen_stages and the heads' dropout (training)."""
    test = {k: spec[k] for k in ("test_mode", "crop_size", "stride") if spec.get(k) is not None}
    return create_segmenter(spec["model_name"], len(spec["classes"]), head=spec["head"], aux_head=spec["aux_head"],
                            channels=spec.get("channels"), dropout=backbone.pop("dropout", 0.1), **test, **backbone)
