"""mmdet 2.x's inference conventions for torchvision's Mask R-CNN and our Cascade Mask R-CNN (`create_detector(...,
conventions="mmdet")`): what an official `mask_rcnn_convnext_*` / `cascade_mask_rcnn_convnext_*` checkpoint was
trained and evaluated with, where torchvision differs:

- anchors: base size = stride, scale 8, ratios 0.5/1/2, centred on the cell's corner, **not rounded**
  (torchvision rounds the base anchors to integers);
- box decoding: mmdet's `delta2bbox` (log-ratio clamped at +-log(1000/16), torchvision clamps only above),
  stds 1 (RPN) and 0.1/0.1/0.2/0.2 (box head; the cascade's stages their own), clipped to the image;
- RoI features: mmcv `RoIAlign(aligned=True, sampling_ratio=0)` at the level `floor(log2(sqrt(area) / 56 + 1e-6))`
  (torchvision: aligned=False, sampling_ratio=2, its own level formula);
- test settings: RPN 1000 per level before NMS 0.7, 1000 after, boxes of any positive size; R-CNN score > 0.05,
  class-wise NMS 0.5, 100 per image, no minimum box size (torchvision drops boxes under 0.01 px); masks pasted
  with mmdet's `_do_paste_mask` (grid_sample of the 28x28 probabilities over the image, then >= 0.5);
- test resize: mmcv `imrescale` into (1333, 800): sizes rounded half up (torchvision floors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks, resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from .cascade import CascadeRoIHeads

WH_RATIO_CLIP = 16 / 1000


class MmdetAnchorGenerator(AnchorGenerator):
    """mmdet `AnchorGenerator(scales=[8], ratios=[0.5, 1, 2], strides=[4 .. 64])`: torchvision's, unrounded, on
    the levels' nominal strides (torchvision divides the padded image by the feature size: 61 instead of 64 for
    the extra level of an 800-px image)."""

    strides = (4, 8, 16, 32, 64)

    def forward(self, image_list, feature_maps):
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(dtype, device)
        levels = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(levels) for _ in image_list.image_sizes]

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)


class MmdetBoxCoder(det_utils.BoxCoder):
    """torchvision's coder with mmdet's `DeltaXYWHBBoxCoder.decode` (weights = 1 / target_stds)."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.to(rel_codes.dtype)
        stds = rel_codes.new_tensor([1 / w for w in self.weights]).repeat(rel_codes.shape[1] // 4)
        d = rel_codes * stds
        dx, dy, dw, dh = d[:, 0::4], d[:, 1::4], d[:, 2::4], d[:, 3::4]
        clip = abs(math.log(WH_RATIO_CLIP))
        dw, dh = dw.clamp(min=-clip, max=clip), dh.clamp(min=-clip, max=clip)
        px, py = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None], ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw, ph = (boxes[:, 2] - boxes[:, 0])[:, None], (boxes[:, 3] - boxes[:, 1])[:, None]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * dx, py + ph * dy
        out = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=2)
        return out.flatten(1)


class MmdetRoIExtractor(nn.Module):
    """mmdet `SingleRoIExtractor` with mmcv `RoIAlign(output_size, sampling_ratio=0, aligned=True)` on the FPN
    levels "0" .. "3" (strides 4 .. 32), in the interface of torchvision's `MultiScaleRoIAlign`."""

    def __init__(self, output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32), finest_scale: int = 56) -> None:
        super().__init__()
        self.output_size, self.strides, self.finest_scale = (output_size, output_size), strides, finest_scale
        self.featmap_names = [str(i) for i in range(len(strides))]

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvl = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return lvl.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        lvl = self.levels(rois)
        for i, (f, stride) in enumerate(zip(feats, self.strides, strict=True)):
            idx = torch.where(lvl == i)[0]
            if len(idx):
                out[idx] = roi_align(f, rois[idx], self.output_size, spatial_scale=1 / stride, sampling_ratio=0,
                                     aligned=True).to(out.dtype)
        return out


class MmdetRoIHeads(RoIHeads):
    """torchvision's RoI heads; detections as mmdet's `multiclass_nms` selects them (no minimum box size)."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split([len(p) for p in proposals]),
                                        pred_scores.split([len(p) for p in proposals]), image_shapes, strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, scores.shape[1], device=scores.device).expand(len(scores), -1).reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


class MmdetTransform(GeneralizedRCNNTransform):
    """Normalise and batch as torchvision; resize as mmcv `imrescale` (sizes rounded half up); masks pasted as
    mmdet's `_do_paste_mask` (probabilities; `>= 0.5` is mmdet's binary mask)."""

    def resize(self, image, target=None):
        h, w = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        long, short = max(size, self.max_size), min(size, self.max_size)
        scale = min(long / max(h, w), short / min(h, w))
        fixed = (int(w * scale + 0.5), int(h * scale + 0.5))
        image, target = _resize_image_and_masks(image, size, self.max_size, target, fixed)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes, strict=True):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], o_im_s)
        return result


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, M, M) mask probabilities -> (N, 1, H, W) in the image, each sampled bilinearly over its box
    (mmdet 2.x `_do_paste_mask`, skip_empty=False)."""
    h, w = int(size[0]), int(size[1])
    if not len(masks):
        return masks.new_zeros((0, 1, h, w))
    x0, y0, x1, y1 = torch.split(boxes.to(torch.float32), 1, dim=1)
    img_y = (torch.arange(0, h, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    img_x = (torch.arange(0, w, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    img_x, img_y = torch.nan_to_num(img_x, posinf=0.0, neginf=0.0), torch.nan_to_num(img_y, posinf=0.0, neginf=0.0)
    n = len(masks)
    grid = torch.stack([img_x[:, None, :].expand(n, h, w), img_y[:, :, None].expand(n, h, w)], dim=3)
    return F.grid_sample(masks.to(torch.float32), grid, align_corners=False)


class MmdetCascadeRoIHeads(CascadeRoIHeads):
    """The cascade's RoI heads; detections as mmdet's `multiclass_nms` selects them."""

    postprocess_detections = MmdetRoIHeads.postprocess_detections


def apply(model: nn.Module) -> nn.Module:
    """A torchvision (Cascade) Mask R-CNN or Faster R-CNN (`create_detector`'s, 800 x 1333) switched to mmdet's
    conventions, in place."""
    rpn, heads = model.rpn, model.roi_heads
    cascade = isinstance(heads, CascadeRoIHeads)
    rpn.anchor_generator = MmdetAnchorGenerator(rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios)
    rpn.box_coder = MmdetBoxCoder((1.0, 1.0, 1.0, 1.0))
    rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], rpn.nms_thresh = 1000, 1000, 0.7
    rpn.min_size = torch.finfo(torch.float32).tiny  # mmdet keeps every box of positive width and height
    if cascade:
        heads.box_coders = [MmdetBoxCoder(c.weights) for c in heads.box_coders]
        heads.box_coder = heads.box_coders[-1]
    else:
        heads.box_coder = MmdetBoxCoder((10.0, 10.0, 5.0, 5.0))
    heads.box_roi_pool = MmdetRoIExtractor(7)
    if getattr(heads, "mask_roi_pool", None) is not None:
        heads.mask_roi_pool = MmdetRoIExtractor(14)
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.05, 0.5, 100
    heads.__class__ = MmdetCascadeRoIHeads if cascade else MmdetRoIHeads  # the same module, mmdet's selection
    t = model.transform
    model.transform = MmdetTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                     size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    return model
