"""Image classification with the ConvNeXt recipe: the first task on the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import (Batch, DataError, ImageFolder, check_same_classes, collate, eval_transform, mixup_cutmix,
                    train_transform, why_unreadable)
from ..eval.metrics import evaluate
from ..factory import create_model
from ..preprocess import Preprocess
from ..weights import save_checkpoint
from .config import TrainConfig
from .task import Task


class ClassificationTask(Task):
    """`DATA/train/<class>/*` and `DATA/val/<class>/*`; cross-entropy on (mixed, smoothed) targets; top-1."""

    best_metric = "val_acc1"
    higher_is_better = True
    sample_kind = "image"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.classes: list[str] = []
        self.mix = None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)  # soft (mixed) targets too

    def preprocess(self) -> Preprocess:
        return Preprocess(input_size=self.cfg.input_size, crop_pct=self.cfg.crop_pct)

    def datasets(self, world_size: int) -> tuple[ImageFolder, ImageFolder]:
        cfg, root = self.cfg, Path(self.cfg.data)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"{root / split} not found: --data must hold train/<class>/* and val/<class>/*")
        train = ImageFolder(root / "train", seed=cfg.seed, cache=cfg.cache_images, transform=train_transform(
            cfg.input_size, scale=cfg.scale, hflip=cfg.hflip, aa=cfg.aa, color_jitter=cfg.color_jitter,
            reprob=cfg.reprob, interpolation_name=cfg.train_interpolation))
        val = ImageFolder(root / "val", cache=cfg.cache_images, transform=eval_transform(self.preprocess()))
        check_same_classes(train, val)
        self.classes = train.classes
        self.mix = mixup_cutmix(len(self.classes), mixup=cfg.mixup, cutmix=cfg.cutmix,
                                switch_prob=cfg.mixup_switch_prob, prob=cfg.mixup_prob)
        return train, val

    def collate(self, items: list[Any]) -> Batch:
        return collate(items)  # (image, class, index) items

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return create_model(cfg.model, pretrained=cfg.finetune or False, num_classes=len(self.classes),
                            drop_path_rate=cfg.drop_path_rate, head_init_scale=cfg.head_init_scale)

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        images = batch.inputs.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        if self.mix is not None:
            images, targets = self.mix(images, targets)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"loss": self.criterion(model(images).float(), targets)}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        res = evaluate(model, loader, device, len(self.classes), precision=self.cfg.precision,
                       channels_last=self.cfg.channels_last, progress=progress, lockstep=lockstep)
        return {"val_loss": res["loss"], "val_acc1": res["acc1"], "val_acc5": res["acc5"]}

    def identity(self) -> dict[str, Any]:
        return {"model_name": self.cfg.model, "classes": self.classes}

    def summary(self, train: ImageFolder, val: ImageFolder | None) -> str:
        return f"{self.cfg.model}: {len(train)} train / {len(val)} val images, {len(self.classes)} classes"

    def save_best(self, model: nn.Module, state_dict: dict[str, torch.Tensor], output: Path, epoch: int,
                  metrics: dict[str, float]) -> None:
        save_checkpoint(model, output / "best.safetensors", state_dict=state_dict, extra_metadata={
            "classes": json.dumps(self.classes), "epoch": str(epoch), "val_acc1": f"{metrics['val_acc1']:.4f}",
            "preprocess": json.dumps(self.preprocess().to_dict()),
        })

    def sample_name(self, dataset: ImageFolder, index: int) -> str:
        return dataset.samples[index][0]

    def unreadable_reason(self, dataset: ImageFolder, index: int) -> str:
        return why_unreadable(dataset.samples[index][0])
