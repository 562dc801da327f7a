"""Object detection (Mask R-CNN, Faster R-CNN, RetinaNet, FCOS on ConvNeXt + FPN): a task on the engine.

Data in COCO format (`DATA/annotations/instances_{train,val}.json`, images in `DATA/train/`, `DATA/val/`,
or any layout through `--train-ann/--train-images/--val-ann/--val-images`). The model is torchvision's
detector; its training forward returns the named losses the engine sums and logs; evaluation is COCO
box (and mask) AP over every validation image, across processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import EngineConfig, _fail
from .task import Task


@dataclass(frozen=True)
class DetectConfig(EngineConfig):
    """Detection: the official ConvNeXt COCO recipe's optimiser (AdamW lr 2e-4 at batch 16, wd 0.05,
    layer-wise decay) with multi-scale training; `input_size` is the shorter image side (torchvision's
    `min_size`)."""

    LAYER_DECAY_TYPES = ("layer_wise",)

    model: str = "convnext_tiny"
    arch: str = "maskrcnn"  # maskrcnn | fasterrcnn | retinanet | fcos
    input_size: int = 800  # shorter side at evaluation (and the largest in multi-scale training)
    max_size: int | None = None  # longer side limit; None: input_size * 1333 / 800 (torchvision's ratio)
    ms_scale: tuple[float, float] = (0.6, 1.0)  # multi-scale training: shorter sides in this range x input_size
    train_ann: str | None = None  # default DATA/annotations/instances_train.json
    train_images: str | None = None  # default DATA/train
    val_ann: str | None = None
    val_images: str | None = None
    pretrained: str | None = None  # backbone weights: any checkpoint create_model loads, or an official det file
    frozen_stages: int = -1
    # head sizes (None: chosen from input_size, see dense.head_defaults)
    proposals: int | None = None  # RPN proposals kept per image in training
    rois_per_image: int | None = None  # RoIs sampled per image for the box head
    box_head_width: int | None = None
    fpn_channels: int = 256  # 128 halves a CPU training step on small images
    hflip: float = 0.5
    crop: float = 0.5  # probability of an IoU-constrained random crop
    photometric: float = 0.5
    # optimisation: official COCO 3x recipe's AdamW
    epochs: int = 36
    batch_size: int = 2
    lr_base: float = 2e-4
    lr_base_batch: int = 16
    warmup_epochs: float = 0.25
    min_lr: float = 0.0
    layer_decay_type: str = "layer_wise"
    num_layers: int | None = None  # layer_wise decay's num_layers; None: 6 for T, 12 for S/B/L/XL (official)

    def __post_init__(self) -> None:
        from ..dense.detection import ARCHS
        from ..factory import check_model_name

        check_model_name(self.model)
        super().__post_init__()
        self._check_choices({"arch": ARCHS})
        if not 0 < self.ms_scale[0] <= self.ms_scale[1] <= 1:
            _fail(f"--ms-scale must be two numbers 0 < min <= max <= 1, got {self.ms_scale}")
        for name in ("hflip", "crop", "photometric"):
            if not 0 <= getattr(self, name) <= 1:
                _fail(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.fsdp:
            _fail("--fsdp is for classification; detectors train with DDP (--nproc)")

    def files(self) -> dict[str, Path]:
        root = Path(self.data)
        return {"train_ann": Path(self.train_ann or root / "annotations" / "instances_train.json"),
                "train_images": Path(self.train_images or root / "train"),
                "val_ann": Path(self.val_ann or root / "annotations" / "instances_val.json"),
                "val_images": Path(self.val_images or root / "val")}


def train_sizes(input_size: int, ms_scale: tuple[float, float], n: int = 5) -> tuple[int, ...]:
    """Multi-scale shorter sides (multiples of 8) ending with `input_size` (torchvision evaluates at the last)."""
    lo, hi = ms_scale[0] * input_size, ms_scale[1] * input_size
    sizes = sorted({max(32, int(round((lo + (hi - lo) * i / max(n - 1, 1)) / 8) * 8)) for i in range(n)})
    return (*[s for s in sizes if s != input_size], input_size)


class DetectionTask(Task):
    best_metric = "bbox_mAP"
    higher_is_better = True
    sample_kind = "image"

    def __init__(self, cfg: DetectConfig) -> None:
        from ..data.coco import require_pycocotools
        from ..dense.detection import LOSS_NAMES

        require_pycocotools()
        super().__init__(cfg)
        self.loss_names = LOSS_NAMES[cfg.arch]
        self.classes: list[str] = []
        self.cat_ids: list[int] = []

    def spec(self) -> dict[str, Any]:
        cfg = self.cfg
        options = {k: v for k, v in (("rpn_post_nms_top_n_train", cfg.proposals),
                                     ("box_batch_size_per_image", cfg.rois_per_image),
                                     ("representation_size", cfg.box_head_width)) if v is not None}
        if cfg.fpn_channels != 256:
            options["fpn_channels"] = cfg.fpn_channels
        return {"task": "detect", "model": cfg.model, "arch": cfg.arch, "classes": self.classes,
                "cat_ids": self.cat_ids, "min_size": cfg.input_size,
                "train_sizes": list(train_sizes(cfg.input_size, cfg.ms_scale)),
                "max_size": cfg.max_size or math.ceil(cfg.input_size * 1333 / 800), "options": options}

    def datasets(self, world_size: int):
        from ..data.coco import CocoDetection, detection_transform

        cfg, f = self.cfg, self.cfg.files()
        masks = cfg.arch == "maskrcnn"
        train = CocoDetection(f["train_ann"], f["train_images"], detection_transform(
            True, hflip=cfg.hflip, crop=cfg.crop, photometric=cfg.photometric), seed=cfg.seed, masks=masks)
        val = CocoDetection(f["val_ann"], f["val_images"], detection_transform(False), masks=masks,
                            cat_ids=train.cat_ids)
        self.classes, self.cat_ids = train.classes, train.cat_ids
        return train, val

    def collate(self, items):
        from ..data.coco import collate_detection

        return collate_detection(items)

    def build_model(self) -> nn.Module:
        from ..dense.io import build_from_spec

        return build_from_spec(self.spec(), pretrained=self.cfg.pretrained, drop_path_rate=self.cfg.drop_path_rate,
                               frozen_stages=self.cfg.frozen_stages)

    def param_groups(self, model: nn.Module) -> list[dict]:
        from ..dense.optim import dense_param_groups
        from ..factory import create_model

        with torch.device("meta"):
            depths = create_model(self.cfg.model).cfg.depths
        return dense_param_groups(model, self.cfg.weight_decay, self.cfg.layer_decay, self.cfg.layer_decay_type,
                                  self.cfg.num_layers, depths)

    def loss(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images = [im.to(device, non_blocking=True) for im in batch.inputs]
        targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                   for t in batch.targets]
        losses = model(images, targets)
        return {k: losses[k].float() for k in self.loss_names}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        from ..eval.dense import evaluate_detection

        res = evaluate_detection(model, loader, device, loader.dataset, precision=self.cfg.precision,
                                 masks=self.cfg.arch == "maskrcnn", progress=progress)
        return {k: v for k, v in res.items() if k != "bad_images"}

    def identity(self) -> dict[str, Any]:
        return {"model_name": self.cfg.model, "classes": self.classes, "dense_spec": self.spec()}

    def summary(self, train, val) -> str:
        return (f"{self.cfg.arch} on {self.cfg.model}: {len(train)} train / {len(val)} val images, "
                f"{len(self.classes)} classes")

    def save_best(self, model: nn.Module, state_dict: dict[str, torch.Tensor], output: Path, epoch: int,
                  metrics: dict[str, float]) -> None:
        from ..dense.io import save_dense

        save_dense(output / "best.safetensors", self.spec(), state_dict,
                   {"epoch": str(epoch), self.best_metric: f"{metrics[self.best_metric]:.4f}"})

    def sample_name(self, dataset, index: int) -> str:
        return dataset.sample_name(index)

    def unreadable_reason(self, dataset, index: int) -> str:
        from ..data import load_rgb

        try:
            img = load_rgb(dataset.image_dir / dataset.images[index]["file_name"])
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"
        im = dataset.images[index]
        if (img.height, img.width) != (im["height"], im["width"]):
            return f"the image is {img.width}x{img.height}, the annotations say {im['width']}x{im['height']}"
        return "failed to decode in a worker"
