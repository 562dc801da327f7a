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


def labelled_subset(data: Path, out: Path, fraction: float = 0.1, seed: int = 0) -> Path:
    """`out/{train,val}`: a class-balanced `fraction` of data/train (fixed seed) and all of data/val, as hard links."""
    import shutil

    from .data.folder import write_once

    def build(tmp: Path) -> None:
        gen = torch.Generator().manual_seed(seed)
        for split in ("train", "val"):
            for cls in sorted(p for p in (data / split).iterdir() if p.is_dir()):
                files = sorted(cls.iterdir())
                if split == "train":
                    pick = torch.randperm(len(files), generator=gen)[:round(len(files) * fraction)].tolist()
                    files = [files[i] for i in sorted(pick)]
                (tmp / split / cls.name).mkdir(parents=True)
                for f in files:
                    try:
                        os.link(f, tmp / split / cls.name / f.name)
                    except OSError:  # no hard links here: copy
                        shutil.copyfile(f, tmp / split / cls.name / f.name)

    return write_once(out, f"{fraction} {seed}", build)


def run_fcmae_demo(output: str | os.PathLike = "runs/demo-fcmae", force: bool = False,
                   pretrain_epochs: int | None = None, epochs: int | None = None) -> dict:
    """`convnext demo --task fcmae`: FCMAE pre-training of convnextv2_atto on the 60,000 Fashion-MNIST training
    images without labels, then fine-tuning on 10% of the labels vs training from scratch on the same 6,000
    images for the same epochs; top-1 on the 10,000 test images, curves in fcmae_vs_scratch.png."""
    import json

    from .data.fashion_mnist import prepare
    from .plots import plot_comparison
    from .train import ClassificationTask, TrainConfig, fit
    from .train.config import finetune_defaults, load_yaml, scale_warmup
    from .train.pretrain import PretrainConfig, PretrainTask

    t0 = time.perf_counter()
    out = Path(output)
    data = prepare(out / "data")
    labelled = labelled_subset(data, out / "data-10pct")
    pre = load_yaml("demo_fcmae_pretrain", PretrainConfig) | {"data": str(data / "train"),
                                                                "output": str(out / "pretrain"), "force": force}
    if pretrain_epochs:  # keep the recipe's warm-up share of the schedule
        pre["warmup_epochs"] = scale_warmup(pre["warmup_epochs"], pre["epochs"], pretrain_epochs)
        pre["epochs"] = pretrain_epochs
    pre_cfg = PretrainConfig(**pre)
    print(f"demo: FCMAE pre-training of {pre_cfg.model} on {data / 'train'} (labels unused), {pre_cfg.epochs} epochs")
    pre_summary = fit(PretrainTask(pre_cfg))
    ft = load_yaml("demo_fcmae_finetune") | {"data": str(labelled), "force": force}
    if epochs:
        ft["warmup_epochs"] = scale_warmup(ft["warmup_epochs"], ft["epochs"], epochs)
        ft["epochs"] = epochs
    runs = {}
    for name, extra in (("scratch", {}), ("fcmae", {"finetune": str(out / "pretrain" / "last.pt")})):
        cfg = TrainConfig(**finetune_defaults(ft | extra | {"output": str(out / name)}))
        print(f"\ndemo: {name}: {cfg.model} on 10% of the labels ({labelled}), {cfg.epochs} epochs")
        runs[name] = fit(ClassificationTask(cfg))
    minutes = (time.perf_counter() - t0) / 60

    def history(run: str) -> list[dict]:
        return [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]

    plot_comparison({"from scratch": history("scratch"), "FCMAE pre-trained, fine-tuned": history("fcmae")},
                    "val_acc1", out / "fcmae_vs_scratch.png",
                    title=f"{pre_cfg.model}, 10% of Fashion-MNIST labels: test top-1",
                    extra=("FCMAE pre-training (60k images, no labels)", history("pretrain"), "train_loss"))
    result = {"scratch_acc1": runs["scratch"]["val_acc1"], "fcmae_acc1": runs["fcmae"]["val_acc1"],
              "scratch_best": runs["scratch"]["best"], "fcmae_best": runs["fcmae"]["best"],
              "pretrain_loss": pre_summary["train_loss"], "minutes": minutes}
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    verdict = "helps" if result["fcmae_acc1"] > result["scratch_acc1"] else "does NOT help at this budget"
    print(f"\ndemo result: with 10% of the labels, {pre_cfg.model} reached {result['fcmae_acc1']:.2f}% top-1 fine-tuned "
          f"from FCMAE ({pre_cfg.epochs} pre-training epochs) vs {result['scratch_acc1']:.2f}% from scratch (best "
          f"{result['fcmae_best']:.2f}% vs {result['scratch_best']:.2f}%) on the 10,000 test images: pre-training "
          f"{verdict}. {minutes:.1f} min on {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}. "
          f"Outputs: {out} (fcmae_vs_scratch.png; pretrain/ with reconstructions.png; scratch/, fcmae/)")
    return result
