"""PNG plots: training curves and confusion matrices (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .utils import atomic_write

# metrics.jsonl bookkeeping that is not a curve
_NOT_PLOTTED = {"epoch", "lr", "step", "train_time_s", "train_img_s", "bad_images", "nan_skipped"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Losses, validation metrics and learning rate against epochs, one panel each (metrics.jsonl keys)."""
    plt = _pyplot()
    keys = list(dict.fromkeys(k for h in history for k in h if k not in _NOT_PLOTTED))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, group in ((axes[0], [k for k in keys if "loss" in k]), (axes[1], [k for k in keys if "loss" not in k])):
        for key in group:
            # a negative metric means "undefined" (COCOeval's -1 for a size range without objects)
            pts = [(h["epoch"], h[key]) for h in history if key in h and ("loss" in key or h[key] >= 0)]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=key)
        if group:
            ax.legend(fontsize="small")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].set(title="validation metrics", xlabel="epoch")
    axes[2].plot([h["epoch"] for h in history], [h["lr"] for h in history], "o-")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_confusion(confusion, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class) with counts annotated when small enough."""
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
    _save(plt, fig, path)


def plot_reconstructions(columns: dict[str, object], path: str | os.PathLike, title: str = "") -> None:
    """A grid of images: one column per entry of `columns` (name -> (K, 3, H, W) tensor in [0, 1]), one row per image."""
    plt = _pyplot()
    names = list(columns)
    k = len(next(iter(columns.values())))
    fig, axes = plt.subplots(k, len(names), figsize=(1.6 * len(names), 1.6 * k), squeeze=False)
    for j, name in enumerate(names):
        for i in range(k):
            ax = axes[i][j]
            ax.imshow(columns[name][i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def plot_comparison(runs: dict[str, Sequence[dict]], key: str | Sequence[str], path: str | os.PathLike,
                    title: str = "", extra: tuple[str, Sequence[dict], str] | None = None) -> None:
    """`key` (e.g. val_acc1; several keys: one panel each) against epochs for several runs; `extra` (name,
    history, key): one more panel (e.g. the pre-training loss)."""
    plt = _pyplot()
    keys = [key] if isinstance(key, str) else list(key)
    n = len(keys) + bool(extra)
    fig, axes = plt.subplots(1, n, figsize=(6 if n == 1 else 5.5 * n, 4), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=False):  # (the extra panel is last)
        for name, history in runs.items():
            pts = [(h["epoch"], h[k]) for h in history if k in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=name)
        ax.set(title=title if title and len(keys) == 1 else k, xlabel="epoch", ylabel=k)
        ax.legend(fontsize="small")
    if extra:
        name, history, k2 = extra
        axes[0][-1].plot([h["epoch"] for h in history], [h[k2] for h in history], "o-")
        axes[0][-1].set(title=name, xlabel="epoch", ylabel=k2)
    for a in axes[0]:
        a.grid(alpha=0.3)
    _save(plt, fig, path)
