"""Cascade Mask R-CNN (Cai & Vasconcelos, 2018), the ConvNeXt paper's COCO detector, from torchvision's parts:
`RoIHeads` with three box stages instead of one, as the official `cascade_mask_rcnn_convnext_*_giou_4conv1f_*`
configs (mmdet 2.x `CascadeRoIHead`) build it:

- each stage a box head of 4 3x3 convs with BatchNorm + 1 fc (torchvision's `FastRCNNConvFCHead`, mmdet's
  `ConvFCBBoxHead(num_shared_convs=4, num_shared_fcs=1)`) and a class-specific predictor, and a mask head of its
  own (4 convs, deconv, 1x1: torchvision's `MaskRCNNHeads` + `MaskRCNNPredictor`);
- training: stage t labels its proposals at IoU 0.5 / 0.6 / 0.7 (plus the ground truth, 512 sampled, a quarter
  positive), its box loss is the GIoU loss of the decoded boxes (x 10, over all sampled RoIs), its losses are
  weighted 1 / 0.5 / 0.25; its boxes, refined by its regression (ground truth class for the positives, the
  predicted one for the rest; the ground-truth proposals left out), are the next stage's proposals;
- regression targets scaled by 1 / stds: (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067);
- test: each stage refines the boxes of the one before by its most likely class; the class scores are the mean of
  the three stages' logits, the boxes the last stage's; the mask is the mean of the three mask heads' probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
GIOU_LOSS_WEIGHT = 10.0


def stage_heads(channels: int, representation_size: int, num_classes: int, masks: bool) -> dict[str, nn.ModuleList]:
    """One stage's modules x 3: `box_head` (4conv + 1fc with BatchNorm), `box_predictor` (class-specific, with the
    background), and with `masks` `mask_head` / `mask_predictor` (256 wide, as torchvision's Mask R-CNN)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    n = len(STAGE_IOUS)
    out = {"box_head": nn.ModuleList(FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [representation_size],
                                                        norm_layer=nn.BatchNorm2d) for _ in range(n)),
           "box_predictor": nn.ModuleList(FastRCNNPredictor(representation_size, num_classes + 1) for _ in range(n))}
    if masks:
        out["mask_head"] = nn.ModuleList(MaskRCNNHeads(channels, [256] * 4, 1) for _ in range(n))
        out["mask_predictor"] = nn.ModuleList(MaskRCNNPredictor(256, 256, num_classes + 1) for _ in range(n))
    return out


class CascadeRoIHeads(RoIHeads):
    """torchvision's `RoIHeads` run as a cascade: `box_head`, `box_predictor`, `mask_head`, `mask_predictor` are
    ModuleLists of one entry per stage; `box_coders` / `matchers` the stages' coders and IoU thresholds (`box_coder`
    is the last stage's: the one the final boxes are decoded with)."""

    def __init__(self, box_roi_pool, heads: dict[str, nn.ModuleList], *, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, mask_roi_pool=None, stage_ious=STAGE_IOUS,
                 stage_loss_weights=STAGE_LOSS_WEIGHTS, stage_stds=STAGE_STDS) -> None:
        weights = [tuple(1.0 / s for s in stds) for stds in stage_stds]
        super().__init__(box_roi_pool, heads["box_head"], heads["box_predictor"], stage_ious[0], stage_ious[0],
                         batch_size_per_image, positive_fraction, weights[-1], score_thresh, nms_thresh,
                         detections_per_img, mask_roi_pool=mask_roi_pool if "mask_head" in heads else None,
                         mask_head=heads.get("mask_head"), mask_predictor=heads.get("mask_predictor"))
        self.stage_ious, self.stage_loss_weights = tuple(stage_ious), tuple(stage_loss_weights)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in stage_ious]
        self.box_coders = [det_utils.BoxCoder(w) for w in weights]
        self.box_coder = self.box_coders[-1]

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            self.check_targets(targets)
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def stage(self, i: int, features, boxes: list[torch.Tensor], image_shapes) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage i's (class logits, class-specific box deltas) for the boxes of each image."""
        x = self.box_head[i](self.box_roi_pool(features, boxes, image_shapes))
        return self.box_predictor[i](x)

    def sample(self, i: int, proposals: list[torch.Tensor], targets) -> tuple[list[torch.Tensor], ...]:
        """Stage i's training RoIs per image: (boxes, matched ground-truth index, label (0: background), is a
        ground-truth box), as torchvision's `select_training_samples` at the stage's IoU threshold."""
        self.proposal_matcher = self.matchers[i]
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        is_gt = [torch.cat([p.new_zeros(len(p), dtype=torch.bool), p.new_ones(len(g), dtype=torch.bool)])
                 for p, g in zip(proposals, gt_boxes, strict=True)]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        keep = self.subsample(labels)
        return ([p[k] for p, k in zip(proposals, keep, strict=True)], [m[k] for m, k in zip(matched, keep, strict=True)],
                [lab[k] for lab, k in zip(labels, keep, strict=True)], [g[k] for g, k in zip(is_gt, keep, strict=True)])

    def losses(self, features, proposals, image_shapes, targets) -> dict[str, torch.Tensor]:
        """`s{i}.loss_classifier`, `s{i}.loss_box_reg`, `s{i}.loss_mask` of every stage, weighted."""
        losses = {}
        for i, w in enumerate(self.stage_loss_weights):
            boxes, matched, labels, is_gt = self.sample(i, proposals, targets)
            logits, deltas = self.stage(i, features, boxes, image_shapes)
            gt = [t["boxes"][m] if len(t["boxes"]) else b.new_zeros(b.shape)
                  for t, m, b in zip(targets, matched, boxes, strict=True)]
            flat = torch.cat(labels)
            losses[f"s{i}.loss_classifier"] = w * F.cross_entropy(logits, flat)
            losses[f"s{i}.loss_box_reg"] = w * giou_loss(self.box_coders[i], deltas, torch.cat(boxes), flat, torch.cat(gt))
            if self.has_mask():
                losses[f"s{i}.loss_mask"] = w * self.mask_loss(i, features, boxes, matched, labels, targets, image_shapes)
            if i < self.num_stages - 1:
                with torch.no_grad():
                    cls = torch.where(flat > 0, flat, logits[:, 1:].argmax(1) + 1)
                    refined = self.refine(i, deltas, boxes, cls, image_shapes)
                proposals = [r[~g] for r, g in zip(refined, is_gt, strict=True)]
        return losses

    def mask_loss(self, i, features, boxes, matched, labels, targets, image_shapes) -> torch.Tensor:
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [b[p] for b, p in zip(boxes, pos, strict=True)]
        logits = self.mask_predictor[i](self.mask_head[i](self.mask_roi_pool(features, mask_boxes, image_shapes)))
        return maskrcnn_loss(logits, mask_boxes, [t["masks"] for t in targets], [t["labels"] for t in targets],
                             [m[p] for m, p in zip(matched, pos, strict=True)])

    def refine(self, i: int, deltas: torch.Tensor, boxes: list[torch.Tensor], classes: torch.Tensor,
               image_shapes) -> list[torch.Tensor]:
        """The boxes moved by stage i's regression for `classes`, clipped to their images (mmdet `regress_by_class`)."""
        picked = deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), classes]
        moved = self.box_coders[i].decode_single(picked, torch.cat(boxes))
        return [box_ops.clip_boxes_to_image(b, s)
                for b, s in zip(moved.split([len(b) for b in boxes]), image_shapes, strict=True)]

    def detect(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        stage_logits, boxes = [], proposals
        for i in range(self.num_stages):
            logits, deltas = self.stage(i, features, boxes, image_shapes)
            stage_logits.append(logits)
            if i < self.num_stages - 1:
                boxes = self.refine(i, deltas, boxes, logits[:, 1:].argmax(1) + 1, image_shapes)
        out = self.postprocess_detections(sum(stage_logits) / len(stage_logits), deltas, boxes, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(*out, strict=True)]
        if self.has_mask():
            mask_boxes, labels = [r["boxes"] for r in result], [r["labels"] for r in result]
            feats = self.mask_roi_pool(features, mask_boxes, image_shapes)
            probs = [maskrcnn_inference(self.mask_predictor[i](self.mask_head[i](feats)), labels)
                     for i in range(self.num_stages)]
            for j, r in enumerate(result):
                r["masks"] = sum(p[j] for p in probs) / self.num_stages
        return result


def giou_loss(coder: det_utils.BoxCoder, deltas: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
              gt: torch.Tensor) -> torch.Tensor:
    """mmdet `BBoxHead.loss` with `reg_decoded_bbox=True` and `GIoULoss(loss_weight=10)`: the positive RoIs' boxes
    decoded for their class against their ground truth, summed and divided by the number of sampled RoIs."""
    pos = torch.where(labels > 0)[0]
    if not len(pos):
        return deltas.sum() * 0
    picked = deltas.view(len(deltas), -1, 4)[pos, labels[pos]]
    pred = coder.decode_single(picked, boxes[pos])
    return GIOU_LOSS_WEIGHT * generalized_box_iou_loss(pred, gt[pos].to(pred.dtype), reduction="sum") / len(labels)
