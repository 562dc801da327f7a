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
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..preprocess import IGNORE_INDEX
from ..utils import all_gather_list, all_reduce_sum, autocast

AP_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # COCOeval.stats[0:6]


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
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels, strict=True)):
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
    return {f"{prefix}_{n}": float(v) for n, v in zip(AP_NAMES, ev.stats[:6], strict=True)}


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
        for out, target in zip(outputs, batch.targets, strict=True):
            results += detections_to_coco(out, target["image_id"], dataset.cat_ids)
    results = all_gather_list(results)
    gt = dataset.coco_gt()  # built once for both evaluations
    metrics = coco_ap(gt, results, "bbox")
    if masks:
        metrics |= coco_ap(gt, [r for r in results if "segmentation" in r], "segm")
    metrics["bad_images"] = float(sum(all_gather_list([bad])))
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
    out["per_class_iou"] = {n: (None if torch.isnan(v) else round(float(v), 4)) for n, v in zip(names, iou, strict=True)}
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
        chunks = zip(batch.inputs, batch.targets, strict=True) if isinstance(batch.inputs, list) else [(batch.inputs,
                                                                                           batch.targets)]
        for images, target in chunks:  # a stacked batch, or images of different sizes one by one
            with autocast(device, precision):
                logits = model(images.to(device))
            target = target.to(device)
            if logits.shape[-2:] != target.shape[-2:]:  # the image was resized: logits back to the mask's size
                logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.float().argmax(1)
            keep = target != IGNORE_INDEX
            if (target[keep] >= num_classes).any():
                raise ValueError(f"label {int(target[keep].max())} in the annotations, but the model has "
                                 f"{num_classes} classes (0..{num_classes - 1}; 255 = ignore)")
            confusion += torch.bincount(target[keep] * num_classes + pred[keep],
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    all_reduce_sum(confusion)
    all_reduce_sum(bad)
    return segmentation_scores(confusion.cpu(), classes) | {"bad_images": float(bad.item()),
                                                            "confusion": confusion.cpu()}


def load_detector(checkpoint, key: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A trained detector (eval mode) and its spec, from any detection file of ours."""
    from ..dense.detection import detector_from_spec
    from ..dense.io import load_model

    return load_model(checkpoint, "detect", detector_from_spec, key=key)


def load_segmenter(checkpoint, key: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A trained segmenter (eval mode) and its spec, from any segmentation file of ours."""
    from ..dense.io import load_model
    from ..dense.segmentation import segmenter_from_spec

    return load_model(checkpoint, "segment", segmenter_from_spec, key=key)


def evaluate_detection_checkpoint(checkpoint, data: str, *, batch_size: int = 4, workers: int = 0,
                                  precision: str = "fp32", key: str | None = None, val_ann: str | None = None,
                                  val_images: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`convnext detect eval`: box (and Mask R-CNN's mask) AP of a trained detector on the COCO-format
    validation split of `data` (DATA/annotations/instances_val.json + DATA/val/, or `val_ann` + `val_images`)."""
    from pathlib import Path

    from torch.utils.data import DataLoader

    from ..data.coco import CocoDetection, collate_detection, detection_transform

    from ..dense.detection import MASK_ARCHS

    model, spec = load_detector(checkpoint, key)
    masks = spec["arch"] in MASK_ARCHS
    ds = CocoDetection(val_ann or Path(data) / "annotations" / "instances_val.json", val_images or Path(data) / "val",
                       detection_transform(False), masks=masks)
    if ds.cat_ids != spec["cat_ids"]:
        raise ValueError(f"the categories of {ds.ann_file} ({ds.cat_ids}) are not the model's ({spec['cat_ids']})")
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
    res = evaluate_detection(model, loader, torch.device("cpu"), ds, precision=precision, masks=masks,
                             progress=progress)
    return res | {"count": len(ds)}


def evaluate_segmentation_checkpoint(checkpoint, data: str, *, batch_size: int = 4, workers: int = 0,
                                     precision: str = "fp32", key: str | None = None,
                                     progress: bool = True) -> dict[str, Any]:
    """`convnext segment eval`: mIoU, mAcc, aAcc and per-class IoU of a trained segmenter on the ADE20K-layout
    validation split of `data` (DATA/images/validation, DATA/annotations/validation)."""
    from torch.utils.data import DataLoader

    from ..data.segdata import SegmentationFolder, collate_segmentation, segmentation_transform

    model, spec = load_segmenter(checkpoint, key)
    ds = SegmentationFolder(data, "val", segmentation_transform(False, spec["input_size"], spec["mean"], spec["std"]),
                            reduce_zero_label=spec["reduce_zero_label"])
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_segmentation)
    res = evaluate_segmentation(model, loader, torch.device("cpu"), len(spec["classes"]), precision=precision,
                                classes=spec["classes"], progress=progress)
    res.pop("confusion")
    return res | {"count": len(ds)}


def _bad_line(res: dict[str, Any]) -> list[str]:
    return [f"{int(res['bad_images'])} unreadable images left out"] if res.get("bad_images") else []


def format_detection_results(res: dict[str, Any], style: str = "text") -> str:
    if style == "json":
        return json.dumps(res)
    return "\n".join([f"{res['count']} images: " + "  ".join(f"{k} {v:.4f}" for k, v in res.items() if "_mAP" in k),
                      *_bad_line(res)])


def format_segmentation_results(res: dict[str, Any], style: str = "text") -> str:
    if style == "json":
        return json.dumps(res)
    return "\n".join([f"{res['count']} images: mIoU {res['mIoU']:.4f}  mAcc {res['mAcc']:.4f}  aAcc {res['aAcc']:.4f}",
                      "per-class IoU: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}"
                                                   for k, v in res["per_class_iou"].items()), *_bad_line(res)])


def format_dense_predictions(results: list[dict[str, Any]], style: str = "text") -> str:
    """`convnext detect|segment predict`'s lines: one per readable image (JSON lines with `style` "json")."""
    ok = [r for r in results if "error" not in r]
    if style == "json":
        return "\n".join(json.dumps(r) for r in ok)
    return "\n".join(f"{r['path']}: {', '.join(r.get('labels', r.get('classes', []))) or 'nothing found'}" for r in ok)


PALETTE = [tuple(int(c) for c in (np.random.default_rng(i).integers(40, 256, 3))) for i in range(256)]


class DensePredictor:
    """Draws each image's predictions into `output/<name>.png` (`eval.predict.output_names`: the input's path
    relative to the inputs' folder, unique in the run) and what the task writes beside; the outputs are checked
    before any work: none over an existing file without `force`, none over an input, no two the same."""

    batch_size = 1

    def __init__(self, load, checkpoint, paths: list, output, *, per_image: tuple[str, ...] = (),
                 once: tuple[str, ...] = (), force: bool = False) -> None:
        from pathlib import Path

        from ..utils import check_output

        from .predict import output_names

        self.out, self.index = Path(output), 0
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--output {self.out} is a file; it must be a folder (created if missing)")
        self.names = {p: [self.out / n for n in names] for p, names in output_names(paths, ("{}.png", *per_image)).items()}
        targets = [t for names in self.names.values() for t in names] + [self.out / name for name in once]
        for t in targets:
            check_output(t, inputs=(*paths, checkpoint), force=force)
        self.model, self.spec = load()  # (once the outputs are known to be writable)
        self.out.mkdir(parents=True, exist_ok=True)

    def __call__(self, paths: list) -> list[dict[str, Any]]:
        from ..data import load_rgb

        report = []
        for path in paths:
            self.index += 1  # 1-based position of the image among all inputs (COCO image_id)
            try:
                img = load_rgb(path)
            except Exception as e:  # noqa: BLE001 - reported per image; the others go on
                report.append({"path": str(path), "error": f"{type(e).__name__}: {e}"})
                continue
            from torchvision.transforms.v2 import functional as TF

            with torch.no_grad():
                row, drawn = self.predict_one(path, TF.pil_to_tensor(img))
            self.write_png(self.names[path][0], drawn.permute(1, 2, 0).numpy())
            report.append(row | {"output": str(self.names[path][0])})
        return report

    @staticmethod
    def write_png(path, array: np.ndarray) -> None:
        from PIL import Image

        from ..utils import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))

    def predict_one(self, path, pixels: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class DetectionPredictor(DensePredictor):
    """Boxes (and masks) drawn into `<stem>.png`; every kept detection in `detections.json` (COCO results
    with `file_name` beside `image_id`)."""

    def __init__(self, checkpoint, paths: list, output, *, score_threshold: float = 0.5, key: str | None = None,
                 force: bool = False) -> None:
        super().__init__(lambda: load_detector(checkpoint, key), checkpoint, paths, output, once=("detections.json",),
                         force=force)
        self.score_threshold, self.results = score_threshold, []

    def predict_one(self, path, pixels: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        det = self.model([pixels.float() / 255])[0]
        keep = det["scores"] >= self.score_threshold
        det = {k: v[keep] for k, v in det.items()}
        labels = det["labels"].tolist()
        names = [f"{self.spec['classes'][label - 1]} {s:.2f}" for label, s in zip(labels, det["scores"].tolist(), strict=True)]
        drawn = pixels
        if "masks" in det and len(det["masks"]):
            drawn = draw_segmentation_masks(drawn, det["masks"][:, 0] > 0.5, alpha=0.45,
                                            colors=[PALETTE[label] for label in labels])
        drawn = draw_bounding_boxes(drawn, det["boxes"], labels=names, width=2, colors=[PALETTE[x] for x in labels])
        self.results += [r | {"file_name": str(path)} for r in detections_to_coco(det, self.index,
                                                                                  self.spec["cat_ids"])]
        return {"path": str(path), "objects": len(names), "labels": names}, drawn

    def finish(self) -> None:
        from pathlib import Path

        from ..utils import atomic_write

        text = json.dumps(self.results)
        atomic_write(self.out / "detections.json", lambda tmp: Path(tmp).write_text(text))


class SegmentationPredictor(DensePredictor):
    """The class map drawn over the image into `<stem>.png`, and `<stem>_mask.png` (class index per pixel)."""

    def __init__(self, checkpoint, paths: list, output, *, key: str | None = None, force: bool = False) -> None:
        super().__init__(lambda: load_segmenter(checkpoint, key), checkpoint, paths, output, per_image=("{}_mask.png",),
                         force=force)

    def predict_one(self, path, pixels: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        from torchvision.utils import draw_segmentation_masks

        from ..data.segdata import EvalResize

        spec = self.spec
        x, _ = EvalResize(spec["input_size"], spec["mean"], spec["std"])(pixels, None)  # as `segment eval` sees it
        logits = self.model(x[None])
        classes = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False).argmax(1)[0]
        present = classes.unique().tolist()
        drawn = draw_segmentation_masks(pixels, torch.stack([classes == c for c in present]), alpha=0.5,
                                        colors=[PALETTE[c] for c in present])
        self.write_png(self.names[path][1], classes.numpy().astype(np.uint8))
        return {"path": str(path), "classes": [spec["classes"][c] for c in present]}, drawn
