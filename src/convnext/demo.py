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


DENSE_DEMOS = {"detect": ("demo_detect", 3000), "segment": ("demo_segment", 3000)}  # recipe, training scenes


def run_dense_demo(task: str, output: str | os.PathLike | None = None, epochs: int | None = None,
                   backbone: str | os.PathLike | None = None, scenes: int | None = None, force: bool = False) -> dict:
    """`convnext demo --task detect|segment`: generate scenes (Fashion-MNIST garments on photographs), train
    Mask R-CNN or UperNet on convnext_atto with the packaged recipe, evaluate on 500 held-out scenes, draw
    predictions. `backbone`: initialise the backbone from a checkpoint (e.g. the classification demo's
    runs/demo/train/best.safetensors); `scenes`: training scenes to generate."""
    from .data.scenes import write_scenes
    from .eval.dense import evaluate_dense_checkpoint, format_dense_results, predict_dense
    from .train import fit
    from .train.config import load_yaml, scale_warmup
    from .train.detection import DetectConfig, DetectionTask
    from .train.segmentation import SegmentationTask, SegmentConfig

    recipe, n_train = DENSE_DEMOS[task]
    config_cls, task_cls = (DetectConfig, DetectionTask) if task == "detect" else (SegmentConfig, SegmentationTask)
    t0 = time.perf_counter()
    out = Path(output or f"runs/demo-{task}")
    data = write_scenes(out / "data", task, n_train=scenes or n_train, n_val=500)
    values = load_yaml(recipe, config_cls) | {"data": str(data), "output": str(out / "train"), "force": force}
    if epochs:
        values["warmup_epochs"] = scale_warmup(values.get("warmup_epochs", 0), values["epochs"], epochs)
        values["epochs"] = epochs
    if backbone:
        values["pretrained"] = str(backbone)
    cfg = config_cls(**values)
    what = f"{cfg.arch} (Mask R-CNN)" if task == "detect" else cfg.head
    print(f"demo: training {what} on {cfg.model} ({'backbone from ' + str(backbone) if backbone else 'from scratch'}) "
          f"on generated scenes ({data}), {cfg.epochs} epochs")
    summary = fit(task_cls(cfg))
    minutes = (time.perf_counter() - t0) / 60
    best = out / "train" / "best.safetensors"
    print(f"\n== evaluate {best}")
    print(format_dense_results(evaluate_dense_checkpoint(best, str(data), progress=False)))
    samples = sorted((data / ("val" if task == "detect" else "images/validation")).glob("*.jpg"))[:4]
    predict_dense(best, samples, out / "predict", score_threshold=0.3, force=True)  # the demo's own folder
    key = "bbox_mAP_50" if task == "detect" else "mIoU"
    extra = f", mask mAP@0.5 {summary['segm_mAP_50']:.3f}" if "segm_mAP_50" in summary else ""
    print(f"\ndemo result: {what} on {cfg.model} reached {key} {summary[key]:.3f}{extra} on 500 held-out scenes in "
          f"{minutes:.1f} min (data + training) on {os.cpu_count()} CPU cores ({cpu_name()}), torch "
          f"{torch.__version__}. Outputs: {out / 'train'} (metrics.jsonl, curves.png, best.safetensors, last.pt), "
          f"{out / 'predict'} (drawn predictions)")
    return summary | {"minutes": minutes}
