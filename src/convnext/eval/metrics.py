"""Exact evaluation: every sample counted once, also across processes (sums are all-reduced)."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str):
    """torch.autocast for bf16/fp16, a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, *, precision: str = "fp32",
             channels_last: bool = False, progress: bool = False, desc: str = "eval", lockstep: bool = False) -> dict:
    """Loss, top-1/top-5 accuracy (%), per-class accuracy and the confusion matrix (rows: truth).

    Works with a loader yielding `(images, targets, indices, bad)` (see `data.collate`); unreadable
    images are counted in `bad_images`, never in the accuracy. `lockstep` (sharded models, whose
    forward is collective) makes ranks with fewer batches run discarded dummy forwards until all
    ranks are done.
    """
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, topk, bad images
    distributed = dist.is_available() and dist.is_initialized()
    n_batches = torch.tensor([len(loader)], device=device)
    if lockstep and distributed:
        dist.all_reduce(n_batches, op=dist.ReduceOp.MAX)
    shape = None
    for images, targets, _, bad in tqdm(loader, desc=desc, disable=not progress, leave=False):
        sums[3] += len(bad)
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
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        top = logits.topk(k, dim=1).indices
        sums[1] += (top[:, 0] == targets).sum()
        sums[2] += (top == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + top[:, 0], minlength=num_classes ** 2).view(
            num_classes, num_classes)
    if lockstep and distributed:
        dummy = torch.zeros((1, *(shape or loader.dataset[0][0].shape)), device=device)
        for _ in range(int(n_batches.item()) - len(loader)):
            model(dummy)
    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
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
