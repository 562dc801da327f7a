"""Exact evaluation: every sample counted once, also across processes (sums are all-reduced)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..utils import all_reduce_max, all_reduce_sum, autocast

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, *, precision: str = "fp32",
             channels_last: bool = False, progress: bool = False, desc: str = "eval", lockstep: bool = False,
             require_finite: bool = True) -> dict:
    """Loss, top-1/top-5 accuracy (%), per-class accuracy and the confusion matrix (rows: truth).

    Works with a loader yielding `data.Batch`es of images and class indices (`data.collate`); unreadable
    images are counted in `bad_images`, never in the accuracy. `lockstep` (sharded models, whose
    forward is collective) makes ranks with fewer batches run discarded dummy forwards until all
    ranks are done. `require_finite`: non-finite outputs are an error (evaluating a checkpoint); a training
    run (which may skip non-finite steps) reports their NaN loss instead.
    """
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, topk, bad images
    n_batches = torch.tensor([len(loader)], device=device)
    if lockstep:
        all_reduce_max(n_batches)
    shape = None
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, targets = batch.inputs, batch.targets
        sums[3] += len(batch.bad)
        if images is None:
            if lockstep and shape is not None:
                model(torch.zeros((1, *shape), device=device))
            continue
        shape = images.shape[1:]
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        if require_finite and not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model's outputs are not finite (NaN/inf) on this data: its results "
                                     "would mean nothing")
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        top = logits.topk(k, dim=1).indices
        sums[1] += (top[:, 0] == targets).sum()
        sums[2] += (top == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + top[:, 0], minlength=num_classes ** 2).view(
            num_classes, num_classes)
    if lockstep and int(n_batches.item()) > len(loader):
        dummy = torch.zeros((1, *(shape or loader.dataset[0][0].shape)), device=device)
        for _ in range(int(n_batches.item()) - len(loader)):
            model(dummy)
    all_reduce_sum(sums)
    all_reduce_sum(confusion)
    n = int(confusion.sum())
    per_class_n = confusion.sum(1).clamp(min=1)
    return {
        "loss": float(sums[0] / max(n, 1)),
        "acc1": 100.0 * float(sums[1]) / max(n, 1),
        "acc5": 100.0 * float(sums[2]) / max(n, 1),
        "count": n,
        "bad_images": int(sums[3]),
        "per_class_acc": (100.0 * confusion.diag() / per_class_n).tolist(),
        "confusion": confusion.cpu(),
    }


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, *, key: str | None = None,
                        batch_size: int = 64, workers: int = 0, precision: str = "fp32",
                        output: str | os.PathLike | None = None, optimize: bool = True,
                        progress: bool = True, force: bool = False) -> dict:
    """`convnext eval`: a checkpoint on an image folder (`<class>/*`, or a root holding `val/`).

    With `optimize` the model runs through `optimize_for_inference` (fused kernels; compiled when
    the evaluation is long enough to earn the compile back); `precision` "bf16" is then a bf16
    model, else autocast. Returns `evaluate`'s results plus `model_name`, `classes`, `root`,
    `how` and `confusion_png`, the confusion-matrix plot written to `output` (default: beside the
    checkpoint; an existing plot only with `force`; never inside `data`).
    """
    from torch.utils.data import DataLoader

    from ..data import ImageFolder, collate
    from ..plots import plot_confusion
    from ..factory import load_for_inference

    from ..utils import check_output, inside

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    folder = Path(output or Path(checkpoint).resolve().parent)
    if inside(folder, root):
        raise ValueError(f"--output {folder} is inside --data {root}: its plot would become an image of the data")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; it must be a folder")
    root = root / "val" if (root / "val").is_dir() else root
    model, info = load_for_inference(checkpoint, key=key)
    png = check_output(folder / "confusion_matrix.png", inputs=(checkpoint,), force=force)
    dataset = ImageFolder(root, transform=info.transform(), classes=info.classes)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    how = f"eager, autocast {precision}" if precision != "fp32" else "eager"
    if optimize and len(dataset):
        from ..models.optimize import optimize_for_inference

        example = next(b.inputs for b in loader if b.inputs is not None)
        model = optimize_for_inference(model, precision=precision, example_input=example, expected_calls=len(loader))
        how, precision = model.how, "fp32"  # the optimized model takes fp32 images whatever its own precision
    res = evaluate(model, loader, torch.device("cpu"), len(info.classes), precision=precision, progress=progress)
    plot_confusion(res["confusion"], info.classes, png,
                   title=f"{info.model_name}: top-1 {res['acc1']:.2f}% on {res['count']} images")
    return res | {"model_name": info.model_name, "classes": info.classes, "root": str(dataset.root),
                  "confusion_png": str(png), "how": how}


def format_results(res: dict) -> str:
    """`evaluate_checkpoint`'s results as the text `convnext eval` prints: totals, then per-class accuracy."""
    lines = [f"{res['model_name']} on {res['root']}: {res['count']} images  top-1 {res['acc1']:.2f}%  "
             f"top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}"
             + (f"  ({res['bad_images']} unreadable skipped)" if res["bad_images"] else "")]
    width = max(len(c) for c in res["classes"])
    for c, acc, n in zip(res["classes"], res["per_class_acc"], res["confusion"].sum(1).tolist(), strict=True):
        lines.append(f"  {c:<{width}}  {acc:6.2f}%  ({n} images)")
    lines.append(f"confusion matrix: {res['confusion_png']}  (model run: {res['how']})")
    return "\n".join(lines)
