"""Exact evaluation of detectors (COCO box and mask AP) and segmenters (mIoU, mAcc, aAcc), also across
processes: detections are gathered to every rank before COCOeval; segmentation confusion matrices are
all-reduced.

COCO AP comes from pycocotools' COCOeval (the reference implementation the COCO leaderboard and
torchvision's detection references use; faster-coco-eval is faster but a re-implementation, and at our
validation sizes evaluation takes seconds).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..utils import autocast

AP_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # COCOeval.stats[0:6]
IGNORE_INDEX = 255


def detections_to_coco(output: dict[str, torch.Tensor], image_id: int, cat_ids: list[int],
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's torchvision detections -> COCO result dicts (category ids mapped back, RLE masks)."""
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores, labels = output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist()
    rles = None
    if "masks" in output:
        from pycocotools import mask as mask_utils

        masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
        for r in rles:
            r["counts"] = r["counts"].decode("ascii")
    out = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        r = {"image_id": image_id, "category_id": cat_ids[label - 1], "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)}
        if rles is not None:
            r["segmentation"] = rles[i]
        out.append(r)
    return out


def coco_ap(coco_gt, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """COCOeval's six AP numbers for `iou_type` ("bbox" or "segm") as {prefix_mAP...: value in [0, 1]}."""
    from pycocotools.cocoeval import COCOeval

    prefix = "bbox" if iou_type == "bbox" else "segm"
    if not results:
        return {f"{prefix}_{n}": 0.0 for n in AP_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no ground truth: kept as -1 (not a score of 0)
    return {f"{prefix}_{n}": float(v) for n, v in zip(AP_NAMES, ev.stats[:6])}


def _gather(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    out: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader, device: torch.device, dataset, *, precision: str = "fp32",
                       masks: bool = False, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Box AP (and with `masks`, Mask R-CNN's mask AP) of `model` on a `CocoDetection` loader, every image once."""
    model.eval()
    results, bad = [], 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        bad += len(batch.bad)
        if batch.inputs is None:
            continue
        with autocast(device, precision):
            outputs = model([im.to(device) for im in batch.inputs])
        for out, target in zip(outputs, batch.targets):
            results += detections_to_coco(out, target["image_id"], dataset.cat_ids)
    results = _gather(results)
    gt = dataset.coco_gt()  # built once for both evaluations
    metrics = coco_ap(gt, results, "bbox")
    if masks:
        metrics |= coco_ap(gt, [r for r in results if "segmentation" in r], "segm")
    metrics["bad_images"] = float(sum(_gather([bad])))
    return metrics


def segmentation_scores(confusion: torch.Tensor, classes: list[str] | None = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (fractions) and per-class IoU from a confusion matrix (rows: truth).

    As mmseg: a class with no pixels in truth or prediction has IoU NaN and is left out of the means."""
    c = confusion.double()
    tp, gt, pred = c.diag(), c.sum(1), c.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
    out = {"mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()), "aAcc": float(tp.sum() / c.sum().clamp(min=1))}
    names = classes or [str(i) for i in range(len(tp))]
    out["per_class_iou"] = {n: (None if torch.isnan(v) else round(float(v), 4)) for n, v in zip(names, iou)}
    return out


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, device: torch.device, num_classes: int, *,
                          precision: str = "fp32", classes: list[str] | None = None, progress: bool = False,
                          desc: str = "eval") -> dict[str, Any]:
    """mIoU / mAcc / aAcc of `model` on a loader of (images, label maps); pixels labelled 255 are ignored."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    bad = torch.zeros(1, dtype=torch.long, device=device)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        bad += len(batch.bad)
        if batch.inputs is None:
            continue
        chunks = zip(batch.inputs, batch.targets) if isinstance(batch.inputs, list) else [(batch.inputs,
                                                                                           batch.targets)]
        for images, target in chunks:  # a stacked batch, or images of different sizes one by one
            with autocast(device, precision):
                logits = model(images.to(device))
            pred = logits.float().argmax(1)
            target = target.to(device)
            keep = target != IGNORE_INDEX
            if (target[keep] >= num_classes).any():
                raise ValueError(f"label {int(target[keep].max())} in the annotations, but the model has "
                                 f"{num_classes} classes (0..{num_classes - 1}; 255 = ignore)")
            confusion += torch.bincount(target[keep] * num_classes + pred[keep],
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(bad)
    return segmentation_scores(confusion.cpu(), classes) | {"bad_images": float(bad.item()),
                                                            "confusion": confusion.cpu()}


def evaluate_dense_checkpoint(checkpoint, data: str, *, batch_size: int = 4, workers: int = 0,
                              precision: str = "fp32", ema: bool = False, ann: str | None = None,
                              images: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`convnext detect|segment eval`: a trained detector or segmenter on the validation split of `data`
    (COCO: DATA/annotations/instances_val.json + DATA/val/, or `ann` + `images`; ADE20K: DATA/*/validation)."""
    from pathlib import Path

    from torch.utils.data import DataLoader

    from ..dense.io import load_dense

    model, spec = load_dense(checkpoint, ema=ema)
    device = torch.device("cpu")
    if spec["task"] == "detect":
        from ..data.coco import CocoDetection, collate_detection, detection_transform

        ds = CocoDetection(ann or Path(data) / "annotations" / "instances_val.json", images or Path(data) / "val",
                           detection_transform(False), masks=spec["arch"] == "maskrcnn")
        if ds.cat_ids != spec["cat_ids"]:
            raise ValueError(f"the categories of {ds.ann_file} ({ds.cat_ids}) are not the model's ({spec['cat_ids']})")
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
        res = evaluate_detection(model, loader, device, ds, precision=precision, masks=spec["arch"] == "maskrcnn",
                                 progress=progress)
        return res | {"count": len(ds), "task": "detect"}
    from ..data.segdata import SegmentationFolder, collate_segmentation, segmentation_transform

    ds = SegmentationFolder(data, "val", segmentation_transform(False, spec["input_size"], spec["mean"], spec["std"]),
                            reduce_zero_label=spec["reduce_zero_label"])
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_segmentation)
    res = evaluate_segmentation(model, loader, device, len(spec["classes"]), precision=precision,
                                classes=spec["classes"], progress=progress)
    res.pop("confusion")
    return res | {"count": len(ds), "task": "segment"}


def format_dense_results(res: dict[str, Any]) -> str:
    if res["task"] == "detect":
        lines = [f"{res['count']} images: " + "  ".join(f"{k} {v:.4f}" for k, v in res.items() if "_mAP" in k)]
    else:
        lines = [f"{res['count']} images: mIoU {res['mIoU']:.4f}  mAcc {res['mAcc']:.4f}  aAcc {res['aAcc']:.4f}",
                 "per-class IoU: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}"
                                              for k, v in res["per_class_iou"].items())]
    if res.get("bad_images"):
        lines.append(f"{int(res['bad_images'])} unreadable images left out")
    return "\n".join(lines)


@torch.no_grad()
def predict_dense(checkpoint, inputs: list, output, *, score_threshold: float = 0.5, ema: bool = False,
                  force: bool = False) -> list[dict[str, Any]]:
    """`convnext detect|segment predict`: draw each image's boxes and masks (or class map) into `output`
    (`<stem>.png`), with `detections.json` (COCO results, `file_name` beside `image_id`) or `<stem>_mask.png`
    (class index per pixel). Existing files are never overwritten without `force`."""
    import json
    from pathlib import Path

    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..data import load_rgb
    from ..dense.io import load_dense
    from ..utils import atomic_write, check_output
    from .predict import expand_images

    model, spec = load_dense(checkpoint, ema=ema)
    files = expand_images(inputs)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    detect = spec["task"] == "detect"
    targets = [out / f"{p.stem}.png" for p in files] + ([out / "detections.json"] if detect else
                                                         [out / f"{p.stem}_mask.png" for p in files])
    for t in targets:
        check_output(t, inputs=tuple(files) + (checkpoint,), force=force)
    palette = [tuple(int(c) for c in (np.random.default_rng(i).integers(40, 256, 3))) for i in range(256)]
    results, report = [], []
    for i, path in enumerate(files):
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001
            report.append({"path": str(path), "error": f"{type(e).__name__}: {e}"})
            continue
        pixels = TF.pil_to_tensor(img)
        if detect:
            det = model([pixels.float() / 255])[0]
            keep = det["scores"] >= score_threshold
            det = {k: v[keep] for k, v in det.items()}
            names = [f"{spec['classes'][label - 1]} {s:.2f}" for label, s in zip(det["labels"].tolist(),
                                                                                  det["scores"].tolist())]
            drawn = pixels
            if "masks" in det and len(det["masks"]):
                drawn = draw_segmentation_masks(drawn, det["masks"][:, 0] > 0.5, alpha=0.45,
                                                colors=[palette[label] for label in det["labels"].tolist()])
            drawn = draw_bounding_boxes(drawn, det["boxes"], labels=names, width=2,
                                        colors=[palette[label] for label in det["labels"].tolist()])
            for r in detections_to_coco(det, i + 1, spec["cat_ids"]):
                results.append(r | {"file_name": str(path)})
            report.append({"path": str(path), "objects": len(names), "labels": names})
        else:
            x = TF.normalize(TF.resize(pixels.float() / 255, spec["input_size"]), spec["mean"], spec["std"])
            pad_h, pad_w = -x.shape[-2] % 32, -x.shape[-1] % 32
            logits = model(torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))[None])[..., :x.shape[-2], :x.shape[-1]]
            classes = torch.nn.functional.interpolate(logits, size=pixels.shape[-2:], mode="bilinear",
                                                      align_corners=False).argmax(1)[0]
            present = classes.unique().tolist()
            drawn = draw_segmentation_masks(pixels, torch.stack([classes == c for c in present]), alpha=0.5,
                                            colors=[palette[c] for c in present])
            atomic_write(out / f"{path.stem}_mask.png",
                         lambda tmp, c=classes: Image.fromarray(c.numpy().astype(np.uint8)).save(tmp, format="PNG"))
            report.append({"path": str(path), "classes": [spec["classes"][c] for c in present]})
        atomic_write(out / f"{path.stem}.png",
                     lambda tmp, d=drawn: Image.fromarray(d.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
    if detect:
        atomic_write(out / "detections.json", lambda tmp: Path(tmp).write_text(json.dumps(results)))
    return report
