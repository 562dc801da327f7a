"""The main job, `convnext demo`: train convnext_atto on the embedded Fashion-MNIST, evaluate, predict, summarise."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .utils import cpu_name


def run_demo(output: str | os.PathLike = "runs/demo", epochs: int | None = None, per_class: int | None = None,
             force: bool = False) -> dict:
    """Prepare the data, train with the packaged demo recipe, evaluate the best weights, predict five images.

    `epochs` overrides the recipe's, keeping its warm-up share of the schedule; `per_class` trains
    and evaluates on the first N images of each class only (a quick check); `force` starts over in
    an output folder that holds an earlier demo. Prints as it goes; returns the training summary
    with `minutes` (data + training).
    """
    from .data.fashion_mnist import prepare
    from .eval import evaluate_checkpoint, format_predictions, format_results, predict_files
    from .train import ClassificationTask, TrainConfig, fit
    from .train.config import load_yaml, scale_warmup

    t0 = time.perf_counter()
    out = Path(output)
    data = prepare(out / "data", per_class={"train": per_class, "val": per_class} if per_class else None)
    values = load_yaml("demo") | {"data": str(data), "output": str(out / "train"), "force": force}
    if epochs:  # keep the recipe's warm-up share of the schedule (1 of 6 epochs)
        values["warmup_epochs"] = scale_warmup(values.get("warmup_epochs", 0), values["epochs"], epochs)
        values["epochs"] = epochs
    cfg = TrainConfig(**values)
    print(f"demo: training {cfg.model} on Fashion-MNIST ({data}) with the demo recipe, {cfg.epochs} epochs")
    summary = fit(ClassificationTask(cfg))
    minutes = (time.perf_counter() - t0) / 60
    best = out / "train" / "best.safetensors"
    print(f"\n== evaluate {best}")
    print(format_results(evaluate_checkpoint(best, data, batch_size=256, output=out / "train")))
    print("\n== predict")
    samples = sorted((data / "val").glob("*/*.png"))[::1000][:5]
    print(format_predictions(predict_files(best, samples, topk=3)))
    print(f"\ndemo result: {cfg.model} reached {summary['val_acc1']:.2f}% top-1 (best {summary['best']:.2f}%) on "
          f"the 10,000 Fashion-MNIST test images in {minutes:.1f} min (data + training) on {os.cpu_count()} CPU cores "
          f"({cpu_name()}), torch {torch.__version__}. Outputs: {out / 'train'} (metrics.jsonl, curves.png, "
          f"confusion_matrix.png, best.safetensors, last.pt)")
    return summary | {"minutes": minutes}
