"""Image classification with the ConvNeXt recipe: the first task on the engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import Preprocess
from ..tasks import TaskSpec, lazy, opt, register
from .config import ClassifyConfig
from .task import Task

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # the task's module is imported by the CLI parser: data and eval (torchvision) load when used
    from torch.utils.data import DataLoader

    from ..data import Batch, ImageFolder


class ClassificationTask(Task):
    """`DATA/train/<class>/*` and `DATA/val/<class>/*`; cross-entropy on (mixed, smoothed) targets; top-1."""

    name = "classify"
    best_metric = "val_acc1"
    higher_is_better = True
    sample_kind = "image"

    def __init__(self, cfg: ClassifyConfig) -> None:
        super().__init__(cfg)
        self.classes: list[str] = []
        self.mix = None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)  # soft (mixed) targets too
        self.class_weight: torch.Tensor | None = None
        self.device_augment = None  # --decode gpu: the train transform, run on the device by `prepare`
        if cfg.multi_label:  # the best checkpoint by mAP
            self.best_metric = "val_mAP"

    def preprocess(self) -> Preprocess:
        return Preprocess(input_size=self.cfg.input_size, crop_pct=self.cfg.crop_pct)

    def datasets(self) -> tuple[ImageFolder, ImageFolder]:
        from ..data import (DataError, ImageFolder, LabelledFiles, check_same_classes, eval_transform, mixup_cutmix,
                            split_folder)

        from ..data.sources import kind, open_split

        cfg, root = self.cfg, Path(self.cfg.data)
        augment = self._augment(draft=cfg.decode == "cpu-draft")
        if kind(cfg.data) != "folder":  # a Hugging Face dataset's or WebDataset shards' splits
            keys = dict(image_key=cfg.image_key, label_key=cfg.label_key, cache=cfg.cache_images,
                        multi_label=cfg.multi_label)
            train = open_split(cfg.data, cfg.train_split, augment, seed=cfg.seed, **keys)
            val = open_split(cfg.data, cfg.val_split, eval_transform(self.preprocess()), classes=train.classes,
                             seed=None, **keys)
        elif cfg.labels is not None:  # any folder, its images listed with their labels
            train = LabelledFiles(root, cfg.labels, augment, seed=cfg.seed, cache=cfg.cache_images,
                                  multi_label=cfg.multi_label)
            val = LabelledFiles(root, cfg.val_labels, eval_transform(self.preprocess()), classes=train.classes,
                                cache=cfg.cache_images, multi_label=cfg.multi_label)
        else:
            train_dir, val_dir = root / cfg.train_split, split_folder(root, cfg.val_split)
            for d in (train_dir, val_dir):
                if not d.is_dir():
                    raise DataError(f"{d} not found: --data must hold {cfg.train_split}/<class>/* and "
                                    f"{cfg.val_split}/<class>/* (or pass --labels and --val-labels files, or "
                                    f"hf:PATH for a Hugging Face dataset)")
            train = ImageFolder(train_dir, seed=cfg.seed, cache=cfg.cache_images, transform=augment)
            val = ImageFolder(val_dir, cache=cfg.cache_images, transform=eval_transform(self.preprocess()))
        check_same_classes(train, val)
        self._decode_on_device(train)
        self.classes = train.classes
        if cfg.class_weights is not None:
            from ..data.folder import class_weights

            self.class_weight = class_weights(cfg.class_weights, train.targets, self.classes)
            logger.info("class weights (%s): %s", cfg.class_weights,
                        ", ".join(f"{c} {w:.3g}" for c, w in zip(self.classes[:8], self.class_weight.tolist(),
                                                                  strict=False)) + (" ..." if len(self.classes) > 8 else ""))
        self.mix = mixup_cutmix(len(self.classes), mixup=cfg.mixup, cutmix=cfg.cutmix,
                                switch_prob=cfg.mixup_switch_prob, prob=cfg.mixup_prob)
        return train, val

    def _augment(self, **how: bool):
        """The recipe's train transform from the config (`how`: `draft` or `tensors`, `data.train_transform`)."""
        from ..data import train_transform

        cfg = self.cfg
        return train_transform(cfg.input_size, scale=cfg.scale, hflip=cfg.hflip, aa=cfg.aa, color_jitter=cfg.color_jitter,
                               reprob=cfg.reprob, interpolation_name=cfg.train_interpolation, **how)

    def _decode_on_device(self, train: ImageFolder) -> None:
        """`--decode cpu-draft|gpu`: the training set's loader workers leave decoding to its transform or to
        `prepare` (the device); validation always decodes as `cpu` (the published protocol)."""
        from ..data import DataError
        from ..data.decode import cuda_available

        cfg = self.cfg
        if cfg.decode == "gpu" and not cuda_available():
            raise DataError("--decode gpu decodes on a CUDA device and this machine has none: use --decode cpu "
                            "(or cpu-draft: JPEGs decoded reduced where the crop allows)")
        train.decode = cfg.decode
        if cfg.decode == "gpu":
            self.device_augment = self._augment(tensors=True)

    def prepare(self, batch: Batch, device: torch.device) -> Batch:
        """`--decode gpu`: the batch's images decoded and augmented on `device`; those no decoder reads go to
        `bad` (their targets dropped)."""
        if self.device_augment is None or batch.inputs is None:
            return batch
        from ..data import Batch
        from ..data.decode import augment_on_device

        images = augment_on_device(batch.inputs, self.device_augment, device)
        keep = [k for k, img in enumerate(images) if img is not None]
        bad = batch.bad + [batch.indices[k] for k in range(len(images)) if images[k] is None]
        targets = batch.targets if len(keep) == len(images) else batch.targets[torch.tensor(keep, device=device)]
        stacked = torch.stack([images[k] for k in keep]) if keep else None
        return Batch(stacked, targets, [batch.indices[k] for k in keep], bad).to(
            device, channels_last=self.cfg.channels_last)

    def collate(self, items: list[Any]) -> Batch:
        from ..data import collate

        if self.cfg.multi_label:
            from ..data.folder import collate_multi_label

            return collate_multi_label(items, len(self.classes))  # (image, classes, index) items
        return collate(items)  # (image, class, index) items

    def build_model(self) -> nn.Module:
        from ..factory import create_model

        cfg = self.cfg
        return create_model(cfg.model, pretrained=cfg.finetune or False, num_classes=len(self.classes),
                            drop_path_rate=cfg.drop_path_rate, head_init_scale=cfg.head_init_scale)

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets = batch.inputs, batch.targets
        if self.mix is not None:
            images, targets = self.mix(images, targets)
        logits = model(images).float()
        if self.cfg.multi_label:  # timm's BinaryCrossEntropy: smoothed targets off = s / C, on = 1 - s + off
            off = self.cfg.smoothing / len(self.classes)
            weight = None if self.class_weight is None else self.class_weight.to(logits.device)
            return {"loss": F.binary_cross_entropy_with_logits(logits, targets * (1 - self.cfg.smoothing) + off,
                                                               weight=weight)}
        if self.class_weight is not None:
            return {"loss": F.cross_entropy(logits, targets, weight=self.class_weight.to(logits.device),
                                            label_smoothing=self.cfg.smoothing)}
        return {"loss": self.criterion(logits, targets)}

    def sample_groups(self, train: ImageFolder):
        """`--sample-order shards`: the samples of each WebDataset shard, visited one shard after another."""
        return train.shard_groups() if self.cfg.sample_order == "shards" else None

    def sample_weights(self, train: ImageFolder):
        """`--balanced-sampler`: 1 / the count of each sample's class (each class drawn as often, in expectation)."""
        if not self.cfg.balanced_sampler:
            return None
        from collections import Counter

        targets = train.targets
        counts = Counter(targets)
        return [1.0 / counts[t] for t in targets]

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        from ..eval.metrics import evaluate, evaluate_multi_label

        if self.cfg.multi_label:
            res = evaluate_multi_label(model, loader, device, len(self.classes), precision=self.cfg.precision,
                                       progress=progress, smoothing=self.cfg.smoothing)
            logger.info("per class F1 / AP (%%): %s", ", ".join(
                f"{c} {_pct(f)}/{_pct(a)}" for c, f, a in zip(self.classes, res["per_class_f1"], res["per_class_ap"],
                                                             strict=True)))
            return {"val_loss": res["loss"], "val_mAP": res["mAP"], "val_f1": res["f1"]}
        res = evaluate(model, loader, device, len(self.classes), precision=self.cfg.precision, progress=progress,
                       lockstep=lockstep, require_finite=False)
        return {"val_loss": res["loss"], "val_acc1": res["acc1"], "val_acc5": res["acc5"]}

    def spec(self) -> dict[str, Any]:
        spec = {"model_name": self.cfg.model, "classes": self.classes, "preprocess": self.preprocess().to_dict()}
        return spec | ({"multi_label": True} if self.cfg.multi_label else {})

    def summary(self, train: ImageFolder, val: ImageFolder | None) -> str:
        return f"{self.cfg.model}: {len(train)} train / {len(val)} val images, {len(self.classes)} classes"

    def save_best(self, model: nn.Module, state_dict: dict[str, torch.Tensor], output: Path, epoch: int,
                  metrics: dict[str, float]) -> None:
        from ..weights import save_checkpoint

        key = self.best_metric
        extra = {"epoch": str(epoch), key: f"{metrics[key]:.4f}"} | ({"multi_label": "true"} if self.cfg.multi_label
                                                                   else {})
        save_checkpoint(model, output / "best.safetensors", state_dict=state_dict, classes=self.classes,
                        preprocess=self.preprocess().to_dict(), extra_metadata=extra)

    def sample_name(self, dataset: ImageFolder, index: int) -> str:
        """The image's name (path, or source/split#index); with labels that the name does not say (a labels file,
        a Hugging Face dataset) also its class, so that a relabelled set is another run's data on resume."""
        from ..data import ImageFolder

        name = dataset.sample_name(index)
        own = type(dataset) is ImageFolder  # the folder is the label
        target = dataset.target(index)
        label = ";".join(dataset.classes[t] for t in target) if isinstance(target, tuple) else dataset.classes[target]
        return name if own else f"{name}\t{label}"

    def unreadable_reason(self, dataset: ImageFolder, index: int) -> str:
        return dataset.unreadable_reason(index)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summarize(s: dict[str, Any]) -> str:
    if "val_mAP" in s:
        return (f"done: {s['model']} epoch {s['epoch']}  val mAP {s['val_mAP']:.2f}%  F1 {s['val_f1']:.2f}%  "
                f"best mAP {s['best']:.2f}%  -> {s['output']}")
    if "val_acc1" not in s:
        return f"done: {s['model']} epoch {s.get('epoch', 0)}  -> {s['output']}"
    return (f"done: {s['model']} epoch {s['epoch']}  val top-1 {s['val_acc1']:.2f}%  top-5 {s['val_acc5']:.2f}%  "
            f"best top-1 {s['best']:.2f}%  -> {s['output']}")


def demo(output: str | None = None, epochs: int | None = None, per_class: int | None = None,
         force: bool = False) -> dict:
    """`convnext demo`: prepare the embedded Fashion-MNIST, train convnext_atto with the packaged demo recipe,
    evaluate the best weights, predict five images, summarise. `epochs` overrides the recipe's (the warm-up
    as `train.config.set_epochs` says); `per_class` trains and evaluates on the first N images of each
    class only (a quick check); `force` starts over in an output folder that holds an earlier demo."""
    import dataclasses
    import time

    from ..data.fashion_mnist import prepare
    from ..eval import evaluate_checkpoint, format_predictions, format_results, predict_files
    from ..utils import machine_line
    from .config import recipe
    from .engine import fit

    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    t0 = time.perf_counter()
    out = Path(output or "runs/demo")
    data = prepare(out / "data", per_class={"train": per_class, "val": per_class} if per_class else None)
    cfg = recipe("demo", ClassifyConfig, epochs=epochs, data=str(data), output=str(out / "train"), force=force)
    if per_class and cfg.batch_size > per_class * 10:  # a quick check on a slice: one batch of all of it
        cfg = dataclasses.replace(cfg, batch_size=per_class * 10)
    print(f"demo: training {cfg.model} on Fashion-MNIST ({data}) with the demo recipe, {cfg.epochs} epochs")
    summary = fit(ClassificationTask(cfg))
    minutes = (time.perf_counter() - t0) / 60
    best = out / "train" / "best.safetensors"
    print(f"\n== evaluate {best}")
    print(format_results(evaluate_checkpoint(best, data, batch_size=256, output=out / "train", force=True)))
    print("\n== predict")
    samples = sorted((data / "val").glob("*/*.png"))[::1000][:5]
    print(format_predictions(predict_files(best, samples, topk=3)))
    print(f"\ndemo result: {cfg.model} reached {summary['val_acc1']:.2f}% top-1 (best {summary['best']:.2f}%) on "
          f"the 10,000 Fashion-MNIST test images in {minutes:.1f} min (data + training, {_precision_said(summary)}) "
          f"{machine_line()}. Outputs: "
          f"{out / 'train'} (metrics.jsonl, curves.png, confusion_matrix.png, best.safetensors, last.pt)")
    return summary | {"minutes": minutes}


def _precision_said(summary: dict) -> str:
    """How the summary line names the training precision: "bf16 autocast" / "fp32", and why when it was chosen."""
    p, choice = summary.get("precision", "fp32"), summary.get("precision_choice") or {}
    name = "bf16 autocast" if p == "bf16" else p
    t = choice.get("timings_ms")
    if t:
        return f"{name}: a step measured {t['fp32'] / t['bf16']:.2f}x as fast in bf16 as in fp32 here"
    return f"{name}: {choice['reason']}" if choice.get("reason") else name


def _format_predictions(results: list[dict], style: str) -> str:
    from ..eval import format_predictions

    return format_predictions([r for r in results if "top" in r or style != "text"], style)


_NO_OPTIMIZE = opt("--no-optimize", dest="optimize", action="store_false",
                   help="run the model as it is (default: optimize_for_inference: fused, compiled when it pays)")
_KEY = opt("--key", help="state dict key, e.g. model_ema for a training checkpoint's EMA weights")


def _predict_options() -> tuple:
    from ..export import BACKENDS

    return (_KEY, opt("--topk", type=int, help="classes per image, 1 .. the model's classes (default: 5, or all if fewer)"),
            opt("--backend", default="torch", choices=["torch", *BACKENDS],
                help="torch: a checkpoint; others: a file from `convnext export` (default: torch)"),
            opt("--precision", choices=["fp32", "bf16"], default="fp32",
                help="bf16: a bf16 model (LayerNorm/GRN statistics in fp32); OpenVINO's precision hint"),
            opt("--threshold", type=float, help="a multi-label classifier's classes: those with a probability >= "
                "this (default 0.5)"),
            _NO_OPTIMIZE)


def _eval_options() -> tuple:
    from ..preprocess import CROP_MODES, INTERPOLATIONS
    from ..utils import PRECISIONS

    return (
        opt("--checkpoint", help="best.safetensors, last.pt or any supported checkpoint (or --model/--pretrained)"),
        opt("--model", help="a registered architecture, e.g. convnext_tiny (with --pretrained)"),
        opt("--pretrained", help="its published weights: a tag (fb_in1k, fb_in22k_ft_in1k_384; `convnext info "
                                 "MODEL` lists them) or a checkpoint of that model; its own preprocessing"),
        _KEY, opt("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)"),
        opt("--precision", choices=list(PRECISIONS), default="fp32",
            help="fp32; bf16 or fp16 (autocast on CUDA; on the CPU bf16 is a bf16 model)"),
        opt("--workers", type=int, help="loader processes (default: sized for the device; none on the CPU)"),
        opt("--input-size", type=int, help="override the resolution (test-time resolution studies)"),
        opt("--crop-pct", type=float, help="override the center-crop fraction (resize to input-size / crop-pct)"),
        opt("--interpolation", choices=list(INTERPOLATIONS), help="override the resize interpolation"),
        opt("--crop-mode", choices=list(CROP_MODES), help="override: center (shorter side) or squash (both sides)"),
        opt("--labels", help="labels of the images in --data (a flat folder): CSV (filename|path,label) or JSONL "
                             "(label: a class, an ImageNet synset or name, or an index), or the ILSVRC2012 devkit "
                             "(its folder, .tar.gz or data/ILSVRC2012_validation_ground_truth.txt)"),
        opt("--valid-classes", help="restrict the logits to these classes: 'folder' (those in --data), imagenet-a, "
                                    "imagenet-r, or a file of class indices or names, one per line"),
        opt("--real-labels", help="the ReaL labels (real.json): ReaL top-1/top-5 beside the original"),
        opt("--split", help="hf:|wds: data: the split to evaluate (default: validation, also found as val)"),
        opt("--image-key", help="hf: the image column (default: the Image feature); wds: its extensions (jpg;png)"),
        opt("--label-key", help="hf: the label column (default: the ClassLabel feature, else label); wds: cls or json"),
        opt("--results-file", help="append one row per run to this .csv, .json or .jsonl (model, weights, "
                                   "dataset, preprocessing, top-1, top-5, ReaL, mCE, count, img/s, device)"),
        opt("--output", help="folder for confusion_matrix.png (<= 100 classes; default: beside the checkpoint) "
                             "or most_confused.csv"),
        opt("--force", action="store_true", help="overwrite an existing confusion_matrix.png / most_confused.csv"),
        _NO_OPTIMIZE,
    )


SPEC = register(TaskSpec(
    name="classify", help="image classification with the ConvNeXt recipe on an image folder",
    config=ClassifyConfig, task=ClassificationTask, load=lazy("convnext.factory:load_for_inference"),
    evaluate=lazy("convnext.eval.classify:evaluate_checkpoint"), format_results=lazy("convnext.eval.classify:format_results"),
    predictor=lazy("convnext.eval.predict:ClassifierPredictor"), format_predictions=_format_predictions,
    summarize=summarize, demo=demo, eval_options=_eval_options(),
    predict_options=_predict_options(), predict_styles=("text", "json", "csv"),
    demo_options=(opt("--per-class", type=int, help="use only the first N images of each class (a quick check)"),),
    top_level=True,
))
