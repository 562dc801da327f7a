"""Exact evaluation: every sample counted once, also across processes (sums are all-reduced)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..utils import all_gather_list, all_reduce_max, all_reduce_sum, autocast

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
    tally = _Tally(num_classes, device)
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
        tally.add(targets, top[:, 0])
    if lockstep and int(n_batches.item()) > len(loader):
        dummy = torch.zeros((1, *(shape or loader.dataset[0][0].shape)), device=device)
        for _ in range(int(n_batches.item()) - len(loader)):
            model(dummy)
    all_reduce_sum(sums)
    res = tally.reduce()
    n = res["count"]
    return {"loss": float(sums[0] / max(n, 1)), "acc1": 100.0 * float(sums[1]) / max(n, 1),
            "acc5": 100.0 * float(sums[2]) / max(n, 1), "bad_images": int(sums[3]), **res}


class _Tally:
    """Per-class counts of a classifier's answers (rows: truth), summed over processes: the C x C confusion
    matrix up to DENSE_CONFUSION_MAX classes; beyond, (images, correct) per class and the codes of the errors."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.c, self.dense = num_classes, num_classes <= DENSE_CONFUSION_MAX
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device) if self.dense else None
        self.per_class = torch.zeros(2, num_classes, dtype=torch.long, device=device)
        self.wrong: list[torch.Tensor] = []  # truth * C + prediction of each error

    def add(self, targets: torch.Tensor, top1: torch.Tensor) -> None:
        codes, hit = targets * self.c + top1, top1 == targets
        if self.dense:
            self.confusion += torch.bincount(codes, minlength=self.c ** 2).view(self.c, self.c)
        else:
            self.per_class[0] += torch.bincount(targets, minlength=self.c)
            self.per_class[1] += torch.bincount(targets[hit], minlength=self.c)
            self.wrong.append(codes[~hit].cpu())

    def reduce(self) -> dict:
        if self.dense:
            all_reduce_sum(self.confusion)
            per_class, confused = torch.stack([self.confusion.sum(1), self.confusion.diag()]), most_confused(
                self.confusion)
        else:
            all_reduce_sum(self.per_class)
            codes = all_gather_list(torch.cat(self.wrong).tolist() if self.wrong else [])
            per_class, confused = self.per_class, _top_pairs(torch.tensor(codes, dtype=torch.long), self.c)
        return {"count": int(per_class[0].sum()),
                "per_class_acc": (100.0 * per_class[1] / per_class[0].clamp(min=1)).tolist(),
                "per_class_count": per_class[0].tolist(),
                "confusion": self.confusion.cpu() if self.dense else None, "confused": confused}


DENSE_CONFUSION_MAX = 1000  # beyond: no C x C matrix (21,841 classes would need 3.8 GB), per-class counts only
PLOT_MAX_CLASSES = 100  # a confusion-matrix plot beyond this is unreadable: the most confused pairs instead


def most_confused(confusion: torch.Tensor, n: int = 20) -> list[tuple[int, int, int]]:
    """The `n` largest off-diagonal cells of a confusion matrix (rows: truth) as (truth, predicted, count)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, idx = off.flatten().topk(min(n, off.numel()))
    c = confusion.shape[0]
    return [(i // c, i % c, k) for k, i in zip(counts.tolist(), idx.tolist(), strict=True) if k > 0]


def _top_pairs(codes: torch.Tensor, num_classes: int, n: int = 20) -> list[tuple[int, int, int]]:
    if not codes.numel():
        return []
    pairs, counts = codes.unique(return_counts=True)
    order = counts.argsort(descending=True, stable=True)[:n]
    return [(int(pairs[i]) // num_classes, int(pairs[i]) % num_classes, int(counts[i])) for i in order]


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, *, key: str | None = None,
                        batch_size: int = 64, workers: int = 0, precision: str = "fp32",
                        output: str | os.PathLike | None = None, optimize: bool = True,
                        progress: bool = True, force: bool = False, labels: str | os.PathLike | None = None) -> dict:
    """`convnext eval`: a checkpoint on an image folder: `<class>/*` (class names or synsets, any subset of
    the model's classes, each mapped to its index in the model's class list), `<index>/*` (ImageNet-V2's
    `0/ .. 999/`), or, with `labels`, any folder and a CSV/JSONL labels file (`data.LabelledFiles`); a root
    holding `val/` means `val/`.

    With `optimize` the model runs through `optimize_for_inference` (fused kernels; compiled when
    the evaluation is long enough to earn the compile back); `precision` "bf16" is then a bf16
    model, else autocast. Returns `evaluate`'s results plus `model_name`, `classes`, `root`,
    `how` and `confusion_png`, the confusion-matrix plot written to `output` (default: beside the
    checkpoint; an existing plot only with `force`; never inside `data`) for up to `PLOT_MAX_CLASSES`
    classes, and `confused`, the most confused pairs (truth, prediction, count).
    """
    from torch.utils.data import DataLoader

    from ..data import ImageFolder, LabelledFiles, collate
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
    root = root / "val" if (root / "val").is_dir() and labels is None else root
    model, info = load_for_inference(checkpoint, key=key)
    png = None
    if len(info.classes) <= PLOT_MAX_CLASSES:
        png = check_output(folder / "confusion_matrix.png", inputs=(checkpoint,), force=force)
    if labels is not None:
        dataset = LabelledFiles(root, labels, transform=info.transform(), classes=info.classes)
    else:
        dataset = ImageFolder(root, transform=info.transform(), classes=info.classes)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    how = f"eager, autocast {precision}" if precision != "fp32" else "eager"
    if optimize and len(dataset):
        from ..models.optimize import optimize_for_inference

        example = next(b.inputs for b in loader if b.inputs is not None)
        model = optimize_for_inference(model, precision=precision, example_input=example, expected_calls=len(loader))
        how, precision = model.how, "fp32"  # the optimized model takes fp32 images whatever its own precision
    res = evaluate(model, loader, torch.device("cpu"), len(info.classes), precision=precision, progress=progress)
    if png is not None:
        plot_confusion(res["confusion"], info.classes, png,
                       title=f"{info.model_name}: top-1 {res['acc1']:.2f}% on {res['count']} images")
    return res | {"model_name": info.model_name, "classes": info.classes, "root": str(dataset.root),
                  "confusion_png": str(png) if png is not None else None, "how": how,
                  "confused": [(info.classes[t], info.classes[p], k) for t, p, k in res["confused"]]}


def format_results(res: dict) -> str:
    """`evaluate_checkpoint`'s results as the text `convnext eval` prints: totals, then per-class accuracy."""
    lines = [f"{res['model_name']} on {res['root']}: {res['count']} images  top-1 {res['acc1']:.2f}%  "
             f"top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}"
             + (f"  ({res['bad_images']} unreadable skipped)" if res["bad_images"] else "")]
    from ..data.imagenet import display_name

    seen = res["per_class_count"]
    shown = [(f"{c} {display_name(c)}" if display_name(c) != c else c, acc, n)
             for c, acc, n in zip(res["classes"], res["per_class_acc"], seen, strict=True) if n or len(seen) <= PLOT_MAX_CLASSES]
    width = max((len(c) for c, _, _ in shown), default=0)
    lines += [f"  {c:<{width}}  {acc:6.2f}%  ({n} images)" for c, acc, n in shown]
    if res["confusion_png"]:
        lines.append(f"confusion matrix: {res['confusion_png']}  (model run: {res['how']})")
    else:
        lines.append("most confused (truth -> predicted, images): "
                     + ("; ".join(f"{display_name(t)} -> {display_name(p)} {k}" for t, p, k in res["confused"])
                        or "none") + f"  (model run: {res['how']})")
    return "\n".join(lines)
