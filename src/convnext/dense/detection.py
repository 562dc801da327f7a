"""ConvNeXt + FPN inside torchvision's detectors (Mask R-CNN, Faster R-CNN, RetinaNet, FCOS): we write
no detector of our own, only the backbone and head sizes that suit the input.

torchvision's defaults are for 800-px COCO: 2,000 RPN proposals, 512 RoIs per image, a 1,024-wide box
head, anchors of 32-512 px. Below 600 px (`min_size`) the defaults shrink with the image (600/300
proposals, 128 RoIs, a 256-wide box head, anchors scaled by min_size / 800 down to 8 px): Mask R-CNN on
convnext_atto at 160 px trains ~5x faster on a CPU than with the COCO settings. Every one can be set.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch import nn

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .backbone import ConvNeXtFPN

ARCHS = ("maskrcnn", "cascade_maskrcnn", "fasterrcnn", "retinanet", "fcos")
MASK_ARCHS = ("maskrcnn", "cascade_maskrcnn")  # the detectors that also segment each object
RCNN_ARCHS = ("maskrcnn", "cascade_maskrcnn", "fasterrcnn")  # two-stage (RPN + RoI heads)
LOSS_NAMES = {
    "maskrcnn": ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"),
    "cascade_maskrcnn": (*(f"s{i}.{n}" for i in range(3) for n in ("loss_classifier", "loss_box_reg", "loss_mask")),
                         "loss_objectness", "loss_rpn_box_reg"),
    "fasterrcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
    "retinanet": ("classification", "bbox_regression"),
    "fcos": ("classification", "bbox_regression", "bbox_ctrness"),
}


def head_defaults(min_size: int) -> dict[str, Any]:
    """Head and proposal sizes for images whose shorter side is `min_size` (COCO settings from 600 px)."""
    if min_size >= 600:
        return dict(rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_train=2000,
                    rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512, representation_size=1024,
                    anchor_scale=1.0)
    return dict(rpn_pre_nms_top_n_train=600, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_train=300,
                rpn_post_nms_top_n_test=300, box_batch_size_per_image=128, representation_size=256,
                anchor_scale=max(0.25, min_size / 800))


def create_detector(name: str, num_classes: int, *, arch: str = "maskrcnn",
                    pretrained: bool | str | os.PathLike | None = None, min_size: int | tuple[int, ...] = 800,
                    max_size: int = 1333,
                    drop_path_rate: float = 0.0, frozen_stages: int = -1, fpn_channels: int = 256,
                    conventions: str | None = None, **kw: Any) -> nn.Module:
    """A torchvision detection model on a ConvNeXt + FPN backbone.

    `arch`: maskrcnn, cascade_maskrcnn (the paper's COCO detector, `dense.cascade`), fasterrcnn, retinanet, fcos.
    `num_classes` counts the object classes without the background (torchvision's R-CNNs add it).
    `min_size`: the shorter image side; a tuple trains at a random one of them per batch (multi-scale)
    and evaluates at the last, as torchvision's detectors do.
    `pretrained` initialises the backbone (any checkpoint `create_model` loads, or an official det/seg
    file). `fpn_channels`: the FPN's width (256 as published; 128 halves a CPU training step on small
    images, where the 3x3 convs on the stride-4 level dominate). Other keywords: the head sizes of
    `head_defaults` (`rpn_*`, `box_batch_size_per_image`, `representation_size`, `anchor_scale`) and any
    keyword of the torchvision model.

    `conventions`: "torchvision" (its anchors, box coder, RoIAlign and test settings) or "mmdet" (those of the
    official checkpoints, `dense.mmdet`; the R-CNNs). An official `mask_rcnn_convnext_*` or
    `cascade_mask_rcnn_convnext_*` file as `pretrained` (with the arch it is) loads whole (every tensor) and means
    "mmdet" unless said otherwise."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    whole, conventions = _conventions(arch, pretrained, name, conventions)
    bb_path, pretrained = pretrained, None if whole is not None else pretrained
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if conventions == "mmdet":  # the official configs' heads and anchors (32 .. 512 px) at any image size
        opts = head_defaults(800) | {"rpn_post_nms_top_n_train": 2000 if arch == "cascade_maskrcnn" else 1000} | kw
    else:
        opts = head_defaults(min_size[-1] if isinstance(min_size, (tuple, list)) else min_size) | kw
    min_size = tuple(min_size) if isinstance(min_size, (tuple, list)) else min_size
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    bb = dict(pretrained=pretrained, drop_path_rate=drop_path_rate, frozen_stages=frozen_stages)
    if arch in ("retinanet", "fcos"):
        return _one_stage(arch, name, num_classes, fpn_channels, bb, common, opts)
    backbone = ConvNeXtFPN(name, out_channels=fpn_channels, **bb)
    model = _rcnn(arch, backbone, num_classes, common, opts)
    return _finish(model, backbone.backbone.strides, conventions, whole, bb_path)


def _one_stage(arch: str, name: str, num_classes: int, fpn_channels: int, bb: dict, common: dict,
               opts: dict) -> nn.Module:
    """RetinaNet or FCOS on P3-P7 (strides 8-128), as torchvision's ResNet versions."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = ConvNeXtFPN(name, extra="p6p7", returned_levels=(1, 2, 3), out_channels=fpn_channels, **bb)
    scale = opts.pop("anchor_scale")
    keep = {k: opts[k] for k in list(opts) if not k.startswith(("rpn_", "box_batch", "representation"))}
    if arch == "retinanet":
        sizes = tuple((round(32 * scale * 2 ** i), round(32 * scale * 2 ** (i + 1 / 3)),
                       round(32 * scale * 2 ** (i + 2 / 3))) for i in range(5))
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
        return RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, **common, **keep)
    anchors = AnchorGenerator(tuple((round(8 * 2 ** i * max(scale, 0.5)),) for i in range(5)), ((1.0,),) * 5)
    return FCOS(backbone, num_classes + 1, anchor_generator=anchors, **common, **keep)


def _rcnn(arch: str, backbone: nn.Module, num_classes: int, common: dict, opts: dict) -> nn.Module:
    """Faster / Mask R-CNN, or Cascade Mask R-CNN: torchvision's Faster R-CNN with `dense.cascade`'s RoI heads."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    scale, rep = opts.pop("anchor_scale"), opts.pop("representation_size")
    anchors = AnchorGenerator(tuple((round(32 * scale * 2 ** i),) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)
    heads = dict(rpn_anchor_generator=anchors, box_head=box_head, box_predictor=FastRCNNPredictor(rep, num_classes + 1))
    if arch == "maskrcnn":
        return MaskRCNN(backbone, **heads, mask_predictor=MaskRCNNPredictor(256, 256, num_classes + 1), **common, **opts)
    model = FasterRCNN(backbone, **heads, **common, **opts)
    if arch == "cascade_maskrcnn":
        from torchvision.ops import MultiScaleRoIAlign

        from .cascade import CascadeRoIHeads, stage_heads

        one = model.roi_heads
        model.roi_heads = CascadeRoIHeads(
            one.box_roi_pool, stage_heads(backbone.out_channels, rep, num_classes, masks=True),
            batch_size_per_image=one.fg_bg_sampler.batch_size_per_image,
            positive_fraction=one.fg_bg_sampler.positive_fraction, score_thresh=one.score_thresh,
            nms_thresh=one.nms_thresh, detections_per_img=one.detections_per_img,
            mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2))
    return model


def _finish(model: nn.Module, strides: list[int], conventions: str, whole: dict | None, path: Any) -> nn.Module:
    _fix_roi_scales(model, strides)
    if conventions == "mmdet":
        from .mmdet import apply

        apply(model)
    if whole is not None:
        from .io import load_whole

        cascade = hasattr(model.roi_heads, "box_coders")
        n = (model.roi_heads.box_predictor[0] if cascade else model.roi_heads.box_predictor).cls_score.out_features
        logits = ([f"roi_heads.mask_predictor.{i}.mask_fcn_logits." for i in range(model.roi_heads.num_stages)]
                  if cascade else ["roi_heads.mask_predictor.mask_fcn_logits."])
        load_whole(model, whole, path, "Cascade Mask R-CNN" if cascade else "Mask R-CNN",
                   ("roi_heads.box_predictor.", *logits), n - 1)
    return model


def _conventions(arch: str, pretrained: Any, name: str, conventions: str | None) -> tuple[dict | None, str]:
    """(our state dict of an official Mask R-CNN `pretrained`, or None; the conventions: mmdet for such a file)."""
    from .io import read_official

    whole = read_official(pretrained, name, "detect", arch) if arch in MASK_ARCHS else None
    conventions = conventions or ("mmdet" if whole is not None else "torchvision")
    if conventions not in ("torchvision", "mmdet") or (conventions == "mmdet" and arch not in RCNN_ARCHS):
        raise ValueError(f"conventions must be torchvision or mmdet (mmdet: {', '.join(RCNN_ARCHS)}), got "
                         f"{conventions!r} for {arch}")
    return whole, conventions


def detector_from_spec(spec: dict[str, Any], **backbone: Any) -> nn.Module:
    """The detector a file's spec describes (`DetectionTask.spec`); `backbone`: pretrained, drop_path_rate,
    frozen_stages (training)."""
    min_size = spec["train_sizes"] if spec.get("train_sizes") else spec["min_size"]
    return create_detector(spec["model_name"], len(spec["classes"]), arch=spec["arch"], min_size=min_size,
                           max_size=spec["max_size"], conventions=spec.get("conventions", "torchvision"), **backbone,
                           **spec.get("options", {}))


def _fix_roi_scales(model: nn.Module, strides: list[int]) -> None:
    """Give the RoI poolers their feature strides instead of letting them guess.

    torchvision's `MultiScaleRoIAlign` infers each level's scale from the first batch it sees (feature
    size / largest unpadded image size, rounded to a power of two) and keeps it for the life of the
    process. With small images the padding to a multiple of 32 can make that guess wrong (a 65-px image
    padded to 96: stride 4 looks like 2), and which batch comes first differs after a resume, so a resumed
    run would not compute what the uninterrupted one did."""
    from torchvision.ops.poolers import initLevelMapper

    levels = [int(math.log2(s)) for s in strides]
    for pool in (model.roi_heads.box_roi_pool, getattr(model.roi_heads, "mask_roi_pool", None)):
        if pool is not None:
            pool.scales = [1.0 / s for s in strides]
            pool.map_levels = initLevelMapper(levels[0], levels[-1], canonical_scale=pool.canonical_scale,
                                              canonical_level=pool.canonical_level)
