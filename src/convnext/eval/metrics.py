"""Exact evaluation: every sample counted once, also across processes (sums are all-reduced)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..utils import all_gather_list, all_reduce_max, all_reduce_sum, autocast

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, *, precision: str = "fp32",
             channels_last: bool = False, progress: bool = False, desc: str = "eval", lockstep: bool = False,
             require_finite: bool = True, valid: Sequence[int] | None = None,
             real: Sequence[Sequence[int] | None] | None = None) -> dict:
    """Loss, top-1/top-5 accuracy (%), per-class accuracy and the confusion matrix (rows: truth).

    Works with a loader yielding `data.Batch`es of images and class indices (`data.collate`); unreadable
    images are counted in `bad_images`, never in the accuracy. `lockstep` (sharded models, whose
    forward is collective) makes ranks with fewer batches run discarded dummy forwards until all
    ranks are done. `require_finite`: non-finite outputs are an error (evaluating a checkpoint); a training
    run (which may skip non-finite steps) reports their NaN loss instead.

    `valid`: the class indices the logits are restricted to (timm's `--valid-labels`: ImageNet-A/-R's 200);
    predictions are still indices among all classes. `real`: per dataset index, the indices correct for that
    image (ReaL labels; None or empty: not counted) -> `real_acc1`, `real_acc5`, `real_count`.
    """
    model.eval()
    k = min(5, num_classes if valid is None else len(valid))
    keep = None if valid is None else torch.as_tensor(list(valid), dtype=torch.long, device=device)
    tally = _Tally(num_classes, device)
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # loss, top1, topk, bad, real top1, real topk, real n
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
        top = _topk(logits, targets, keep, k, sums)
        sums[1] += (top[:, 0] == targets).sum()
        sums[2] += (top == targets[:, None]).any(dim=1).sum()
        if real is not None:
            _count_real(top.cpu(), [real[i] for i in batch.indices], sums)
        tally.add(targets, top[:, 0])
    if lockstep and int(n_batches.item()) > len(loader):
        dummy = torch.zeros((1, *(shape or loader.dataset[0][0].shape)), device=device)
        for _ in range(int(n_batches.item()) - len(loader)):
            model(dummy)
    all_reduce_sum(sums)
    res = tally.reduce()
    n, m = max(res["count"], 1), max(float(sums[6]), 1.0)
    real_res = {"real_acc1": 100.0 * float(sums[4]) / m, "real_acc5": 100.0 * float(sums[5]) / m,
                "real_count": int(sums[6])} if real is not None else {}
    return {"loss": float(sums[0] / n), "acc1": 100.0 * float(sums[1]) / n, "acc5": 100.0 * float(sums[2]) / n,
            "bad_images": int(sums[3]), **res, **real_res}


def _topk(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None, k: int,
          sums: torch.Tensor) -> torch.Tensor:
    """The k best class indices per image (among `keep` only, when given); adds the loss sum to sums[0]."""
    if keep is None:
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        return logits.topk(k, dim=1).indices
    sub = logits.index_select(1, keep)
    where = torch.full((logits.shape[1],), -1, dtype=torch.long, device=logits.device)
    where[keep] = torch.arange(len(keep), device=logits.device)
    if bool((where[targets] < 0).any()):
        raise ValueError("an image's class is not among the valid classes (--valid-classes)")
    sums[0] += F.cross_entropy(sub, where[targets], reduction="sum").double()
    return keep[sub.topk(k, dim=1).indices]


def _count_real(top: torch.Tensor, labels: list[Sequence[int] | None], sums: torch.Tensor) -> None:
    """ReaL accuracy counts as timm's `RealLabelsImagenet`: an image is right at k when any of its k best
    predictions is one of its labels; images without labels are not counted."""
    for pred, good in zip(top.tolist(), labels, strict=True):
        if good:
            sums[4] += pred[0] in good
            sums[5] += any(p in good for p in pred)
            sums[6] += 1


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


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision of (N, C) scores against (N, C) 0/1 targets, as sklearn's
    `average_precision_score` (sum over thresholds of the recall step times the precision there; tied scores
    one threshold); NaN for a class without positives."""
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for c in range(scores.shape[1]):
        s, y = scores[:, c].double(), targets[:, c].double()
        if y.sum() == 0:
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s, y = s[order], y[order]
        last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([len(s) - 1])])  # tie group ends
        tps = torch.cumsum(y, 0)[last]
        precision, recall = tps / (last + 1).double(), tps / y.sum()
        out[c] = (torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64)) * precision).sum()
    return out


@torch.no_grad()
def evaluate_multi_label(model: nn.Module, loader, device: torch.device, num_classes: int, *, precision: str = "fp32",
                         progress: bool = False, threshold: float = 0.5, smoothing: float = 0.0) -> dict:
    """Several classes per image: the BCE loss, mAP (the mean of the classes' average precision, over those with
    positives), F1 per class and its mean at `threshold` on the sigmoid, from every image of every process
    (scores gathered, so that the AP is exactly one process's)."""
    model.eval()
    scores, targets, bad = [], [], 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        bad += len(batch.bad)
        if batch.inputs is None:
            continue
        with autocast(device, precision):
            logits = model(batch.inputs.to(device, non_blocking=True))
        scores.append(logits.float().cpu())
        targets.append(batch.targets.float().cpu())
    scores, targets = all_gather_list(scores), all_gather_list(targets)  # (every rank takes part, even with none)
    scores = torch.cat(scores) if scores else torch.zeros(0, num_classes)
    targets = torch.cat(targets) if targets else torch.zeros(0, num_classes)
    off = smoothing / num_classes
    loss = F.binary_cross_entropy_with_logits(scores, targets * (1 - smoothing) + off) if len(scores) else torch.nan
    ap = average_precision(torch.sigmoid(scores), targets)
    pred = torch.sigmoid(scores) >= threshold
    tp, fp = (pred & (targets > 0)).sum(0).double(), (pred & (targets == 0)).sum(0).double()
    fn = (~pred & (targets > 0)).sum(0).double()
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
    return {"loss": float(loss), "mAP": 100.0 * float(ap.nanmean()), "f1": 100.0 * float(f1.nanmean()),
            "per_class_ap": [None if torch.isnan(v) else float(v) for v in ap],
            "per_class_f1": [None if torch.isnan(v) else float(v) for v in f1], "count": len(scores),
            "bad_images": int(sum(all_gather_list([bad])))}
