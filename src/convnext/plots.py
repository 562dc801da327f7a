"""PNG plots: training curves and confusion matrices (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss, accuracy and learning rate against epochs, one panel each."""
    from .weights.io import atomic_write

    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any("val_loss" in h for h in history):
        axes[0].plot([h["epoch"] for h in history if "val_loss" in h],
                     [h["val_loss"] for h in history if "val_loss" in h], "o-", label="val")
    axes[0].set(title="loss", xlabel="epoch")
    for key, label in (("val_acc1", "top-1"), ("val_acc5", "top-5"), ("val_acc1_ema", "top-1 EMA")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), "o-", label=label)
    axes[1].set(title="validation accuracy (%)", xlabel="epoch")
    axes[2].plot(ep, [h["lr"] for h in history], "o-")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_confusion(confusion, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class) with counts annotated when small enough."""
    from .weights.io import atomic_write

    plt = _pyplot()
    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = max(5, min(20, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=60, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j] > 0:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
