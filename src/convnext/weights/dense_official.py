"""The official ConvNeXt det/seg checkpoints whole: the key table between our segmenter and the mmseg 0.x layout
of `upernet_convnext_*_ade20k.pth` (backbone, UPerHead decode head, FCN auxiliary head, BatchNorm statistics),
both ways and bit-exact, so that every tensor of an official file loads (nothing dropped) and ours can go back.

mmseg names a conv + BN + ReLU block (`ConvModule`) `<prefix>.conv` / `<prefix>.bn`; ours is a Sequential,
`<prefix>.0` / `<prefix>.1`. The backbone is the official classification layout under `backbone.` plus the
per-level `backbone.norm{i}` (`dense.backbone`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# (our conv_bn_relu prefix, mmseg ConvModule prefix); {i}: an index, the same on both sides
_SEG_CONV_MODULES = (
    ("decode_head.ppm.pools.{i}.1", "decode_head.psp_modules.{i}.1"),
    ("decode_head.ppm.bottleneck", "decode_head.bottleneck"),
    ("decode_head.lateral.{i}", "decode_head.lateral_convs.{i}"),
    ("decode_head.fpn.{i}", "decode_head.fpn_convs.{i}"),
    ("decode_head.fuse", "decode_head.fpn_bottleneck"),
    ("aux_head.conv", "auxiliary_head.convs.0"),
)
_SEG_PLAIN = (("decode_head.cls", "decode_head.conv_seg"), ("aux_head.cls", "auxiliary_head.conv_seg"))
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rules(to_official: bool) -> list[tuple[re.Pattern, str]]:
    """(pattern of a full key on one side, replacement template of the other side)."""
    out = []
    for ours, theirs in _SEG_CONV_MODULES:
        for a, b, params in ((".0", ".conv", ("weight",)), (".1", ".bn", _BN)):
            src, dst = (ours + a, theirs + b) if to_official else (theirs + b, ours + a)
            for p in params:
                out.append((re.compile(re.escape(f"{src}.{p}").replace(r"\{i\}", r"(\d+)") + "$"),
                            f"{dst}.{p}".replace("{i}", r"\1")))
    for ours, theirs in _SEG_PLAIN:
        src, dst = (ours, theirs) if to_official else (theirs, ours)
        for p in ("weight", "bias"):
            out.append((re.compile(re.escape(f"{src}.{p}") + "$"), f"{dst}.{p}"))
    return out


def _rename_heads(sd: Mapping[str, torch.Tensor], to_official: bool) -> dict[str, torch.Tensor]:
    from .io import CheckpointError

    rules, out = _rules(to_official), {}
    for k, v in sd.items():
        new = next((pat.sub(rep, k) for pat, rep in rules if pat.match(k)), None)
        if new is None:
            side = "our segmenter" if to_official else "the mmseg UperNet layout"
            raise CheckpointError(f"{k} is not a tensor of {side}; nothing was converted")
        out[new] = v
    return out


def segmenter_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our segmenter's state dict -> the official mmseg 0.x UperNet layout (every tensor, BN statistics too)."""
    from .convert import from_ours

    body = {k[len("backbone.body."):]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    norms = {k: v for k, v in sd.items() if re.match(r"backbone\.norm\d\.", k)}
    heads = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    return ({f"backbone.{k}": v for k, v in from_ours(body, "official").items()} | norms
            | _rename_heads(heads, True))


def segmenter_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official mmseg UperNet layout -> our segmenter's state dict (every tensor; an unknown key is an error)."""
    from .convert import to_ours

    body = _backbone_body(sd)
    norms = {k: v for k, v in sd.items() if re.match(r"backbone\.norm\d\.", k)}
    heads = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    _, ours = to_ours(body, "official")
    return {f"backbone.body.{k}": v for k, v in ours.items()} | norms | _rename_heads(heads, False)


def _backbone_body(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier-layout backbone of an official det/seg state dict (`backbone.*` without the level norms)."""
    return {k[len("backbone."):]: v for k, v in sd.items()
            if k.startswith("backbone.") and not re.match(r"backbone\.norm\d\.", k)}


def _backbone_name(sd: Mapping[str, torch.Tensor], what: str) -> str:
    from .convert import infer_model_name, to_ours
    from .io import CheckpointError

    try:
        return infer_model_name(to_ours(_backbone_body(sd), "official")[1])
    except (CheckpointError, KeyError, ValueError):
        raise CheckpointError(f"the backbone of this {what} checkpoint is no ConvNeXt this library knows") from None


def packaged_classes(filename: str, n: int, size: int) -> list[str]:
    """The class names in package data `data/classes/<filename>` for a head of `size` outputs, else "0" .. "N-1"."""
    from importlib import resources

    if n != size:
        return [str(i) for i in range(n)]
    text = resources.files("convnext").joinpath("data", "classes", filename).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def is_official_segmenter(sd: Mapping[str, Any]) -> bool:
    return "decode_head.conv_seg.weight" in sd and any(str(k).startswith("backbone.") for k in sd)


def official_segmenter_spec(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
                            filename: str = "") -> dict[str, Any]:
    """The spec (`train.segmentation` fields) an official UperNet file describes: its backbone, classes
    (mmseg's meta CLASSES, else ADE20K's 150 names for 150 outputs, else indices), heads and widths; the
    official single-scale test (`*_ss.py` configs): slide inference, 512-px windows 341 apart, 640 / 426 for the
    22k-pretrained files (L, XL, and B when its file name says 640)."""
    from .io import CheckpointError

    name = _backbone_name(sd, "UperNet")
    n = int(sd["decode_head.conv_seg.weight"].shape[0])
    channels = int(sd["decode_head.conv_seg.weight"].shape[1])
    aux = "auxiliary_head.conv_seg.weight" in sd
    if aux and int(sd["auxiliary_head.convs.0.conv.weight"].shape[0]) != (256 if channels == 512 else max(channels // 2, 16)):
        raise CheckpointError("the auxiliary head's width is not the official 256 (half the decode head's)")
    classes = list((meta or {}).get("CLASSES") or packaged_classes("ade20k.txt", n, 150))
    if len(classes) != n:
        raise CheckpointError(f"its meta names {len(classes)} classes for a {n}-class head")
    size = 640 if name in _AT_640 or "640" in str(filename) else 512
    return {"model_name": name, "head": "upernet", "aux_head": aux, "channels": None if channels == 512 else channels,
            "classes": [str(c) for c in classes], "input_size": size, "reduce_zero_label": n == 150,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "test_mode": "slide", "crop_size": size, "stride": 426 if size == 640 else 341}


_AT_640 = ("convnext_large", "convnext_xlarge")  # (B has both 512 and 640 files; its width cannot tell them apart)


# ---- (Cascade) Mask R-CNN (mmdet 2.x `mask_rcnn_convnext_*`, `cascade_mask_rcnn_convnext_*`) <-> torchvision's
# MaskRCNN (and `dense.cascade`) on our ConvNeXt + FPN ----------------------------------------------------------------

# (our key, mmdet key); {i}: an index, {s}: a cascade stage, {p}: a parameter (weight, bias, BatchNorm's buffers).
# Class rows are reordered by `_det_rows`. Cascade: each stage's box head is torchvision's FastRCNNConvFCHead
# (4 x conv-BN-ReLU at 0..3, Flatten at 4, the fc at 5), mmdet's ConvFCBBoxHead (shared_convs ConvModules, shared_fcs).
_DET_KEYS = (
    ("backbone.fpn.inner_blocks.{i}.0.{p}", "neck.lateral_convs.{i}.conv.{p}"),
    ("backbone.fpn.layer_blocks.{i}.0.{p}", "neck.fpn_convs.{i}.conv.{p}"),
    ("rpn.head.conv.0.0.{p}", "rpn_head.rpn_conv.{p}"),
    ("rpn.head.cls_logits.{p}", "rpn_head.rpn_cls.{p}"),
    ("rpn.head.bbox_pred.{p}", "rpn_head.rpn_reg.{p}"),
    ("roi_heads.box_head.fc6.{p}", "roi_head.bbox_head.shared_fcs.0.{p}"),
    ("roi_heads.box_head.fc7.{p}", "roi_head.bbox_head.shared_fcs.1.{p}"),
    ("roi_heads.box_predictor.cls_score.{p}", "roi_head.bbox_head.fc_cls.{p}"),
    ("roi_heads.box_predictor.bbox_pred.{p}", "roi_head.bbox_head.fc_reg.{p}"),
    ("roi_heads.mask_head.{i}.0.{p}", "roi_head.mask_head.convs.{i}.conv.{p}"),
    ("roi_heads.mask_predictor.conv5_mask.{p}", "roi_head.mask_head.upsample.{p}"),
    ("roi_heads.mask_predictor.mask_fcn_logits.{p}", "roi_head.mask_head.conv_logits.{p}"),
    ("roi_heads.box_head.{s}.{i}.0.{p}", "roi_head.bbox_head.{s}.shared_convs.{i}.conv.{p}"),
    ("roi_heads.box_head.{s}.{i}.1.{p}", "roi_head.bbox_head.{s}.shared_convs.{i}.bn.{p}"),
    ("roi_heads.box_head.{s}.5.{p}", "roi_head.bbox_head.{s}.shared_fcs.0.{p}"),
    ("roi_heads.box_predictor.{s}.cls_score.{p}", "roi_head.bbox_head.{s}.fc_cls.{p}"),
    ("roi_heads.box_predictor.{s}.bbox_pred.{p}", "roi_head.bbox_head.{s}.fc_reg.{p}"),
    ("roi_heads.mask_head.{s}.{i}.0.{p}", "roi_head.mask_head.{s}.convs.{i}.conv.{p}"),
    ("roi_heads.mask_predictor.{s}.conv5_mask.{p}", "roi_head.mask_head.{s}.upsample.{p}"),
    ("roi_heads.mask_predictor.{s}.mask_fcn_logits.{p}", "roi_head.mask_head.{s}.conv_logits.{p}"),
)
DETECTOR_NAMES = {"maskrcnn": "a Mask R-CNN", "cascade_maskrcnn": "a Cascade Mask R-CNN"}


def _template(t: str) -> re.Pattern:
    return re.compile(re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>\d+)")
                      .replace(r"\{p\}", "(?P<p>" + "|".join(_BN) + ")") + "$")


def _fill(t: str, m: re.Match) -> str:
    g = m.groupdict()
    return t.replace("{i}", g.get("i") or "").replace("{s}", g.get("s") or "").replace("{p}", m["p"])


def _det_rows(key: str, v: torch.Tensor, to_official: bool) -> torch.Tensor:
    """Class rows between torchvision (background first: class c at row c, box deltas at rows 4c..4c+3) and mmdet
    (background last in fc_cls; no background rows in fc_reg and conv_logits). The background's box and mask rows,
    which nothing reads, become zeros on the way to torchvision."""
    if key.endswith("fc_cls.weight") or key.endswith("fc_cls.bias"):  # mmdet [c0 .. c79, bg] <-> tv [bg, c0 ..]
        return torch.cat([v[1:], v[:1]]) if to_official else torch.cat([v[-1:], v[:-1]])
    if "fc_reg" in key or "conv_logits" in key:
        rows = 4 if "fc_reg" in key else 1
        return v[rows:] if to_official else torch.cat([v.new_zeros((rows, *v.shape[1:])), v])
    return v


def detector_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (Cascade) Mask R-CNN's state dict -> the official mmdet 2.x layout (every tensor that computes anything)."""
    from .convert import from_ours
    from .io import CheckpointError

    prefix = "backbone.backbone.body."
    body = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {f"backbone.{k}": v for k, v in from_ours(body, "official").items()}
    for k, v in sd.items():
        if k.startswith(prefix):
            continue
        if re.match(r"backbone\.backbone\.norm\d\.", k):
            out[k[len("backbone."):]] = v
            continue
        for ours, theirs in _DET_KEYS:
            m = _template(ours).match(k)
            if m:
                new = _fill(theirs, m)
                out[new] = _det_rows(new, v, True)
                break
        else:
            raise CheckpointError(f"{k} is not a tensor of the official (Cascade) Mask R-CNN; nothing was converted")
    return out


def detector_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official mmdet 2.x (Cascade) Mask R-CNN layout -> our detector's state dict (an unknown key is an error)."""
    from .convert import to_ours
    from .io import CheckpointError

    body = _backbone_body(sd)
    out = {f"backbone.backbone.body.{k}": v for k, v in to_ours(body, "official")[1].items()}
    for k, v in sd.items():
        if k.startswith("backbone."):
            if re.match(r"backbone\.norm\d\.", k):
                out[f"backbone.{k}"] = v
            continue
        for ours, theirs in _DET_KEYS:
            m = _template(theirs).match(k)
            if m:
                out[_fill(ours, m)] = _det_rows(k, v, False)
                break
        else:
            raise CheckpointError(f"{k} is not a tensor of the mmdet (Cascade) Mask R-CNN layouts this library reads "
                                  f"(the published `mask_rcnn_convnext_*` and `cascade_mask_rcnn_convnext_*_giou_4conv1f` "
                                  f"heads); nothing was converted")
    return out


def is_official_detector(sd: Mapping[str, Any]) -> bool:
    return "rpn_head.rpn_cls.weight" in sd and ("roi_head.bbox_head.fc_cls.weight" in sd
                                                 or "roi_head.bbox_head.0.fc_cls.weight" in sd)


COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                     32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                     58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                     88, 89, 90)  # mmdet's label i is COCO category COCO_CATEGORY_IDS[i] (sorted ids, as CocoDataset)


def official_detector_spec(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec (`train.detection` fields) an official Mask R-CNN or Cascade Mask R-CNN file describes: its
    backbone, the detector (`arch`), its classes (meta CLASSES, else COCO's 80 names for 80 classes, else indices)
    with their COCO category ids, the official test scale (1333 x 800) and mmdet's conventions."""
    from .io import CheckpointError

    cascade = "roi_head.bbox_head.0.fc_cls.weight" in sd
    name = _backbone_name(sd, "Cascade Mask R-CNN" if cascade else "Mask R-CNN")
    head = "roi_head.bbox_head.0." if cascade else "roi_head.bbox_head."
    if cascade:
        _check_cascade(sd)
    n = int(sd[head + "fc_cls.weight"].shape[0]) - 1
    classes = list((meta or {}).get("CLASSES") or packaged_classes("coco.txt", n, 80))
    if len(classes) != n:
        raise CheckpointError(f"its meta names {len(classes)} classes for an {n}-class head")
    fc = head + ("shared_fcs.0.weight" if cascade else "shared_fcs.1.weight")
    spec = {"model_name": name, "arch": "cascade_maskrcnn" if cascade else "maskrcnn",
            "classes": [str(c) for c in classes], "min_size": 800, "max_size": 1333, "train_sizes": None,
            "conventions": "mmdet", "options": {"representation_size": int(sd[fc].shape[0])}}
    spec["cat_ids"] = list(COCO_CATEGORY_IDS) if n == 80 else list(range(1, n + 1))
    return spec


def _check_cascade(sd: Mapping[str, torch.Tensor]) -> None:
    """The published cascade files' heads: 3 stages of 4conv1fc box heads with BatchNorm, class-specific boxes,
    a mask head each (the non-GIoU `cascade_mask_rcnn_convnext_fpn.py` base with 2-fc heads published no file)."""
    from .io import CheckpointError

    stages = sorted({int(m[1]) for k in sd if (m := re.match(r"roi_head\.bbox_head\.(\d+)\.fc_cls\.weight$", k))})
    n = int(sd["roi_head.bbox_head.0.fc_cls.weight"].shape[0])
    if stages != [0, 1, 2]:
        raise CheckpointError(f"a Cascade Mask R-CNN of stages {stages}: the published ones have 3 (0, 1, 2)")
    for s in stages:
        h = f"roi_head.bbox_head.{s}."
        if f"{h}shared_convs.3.bn.weight" not in sd or f"{h}shared_fcs.1.weight" in sd:
            raise CheckpointError("its box heads are not the published 4conv1fc heads with BatchNorm "
                                  "(`*_giou_4conv1f_*` configs): 2-fc cascade heads are not built here")
        if int(sd[f"{h}fc_reg.weight"].shape[0]) != 4 * (n - 1):
            raise CheckpointError("its box regression is not class-specific (reg_class_agnostic=False in the published "
                                  "configs)")
        if f"roi_head.mask_head.{s}.conv_logits.weight" not in sd:
            raise CheckpointError(f"stage {s} has no mask head: a Cascade R-CNN without masks is not built here")
