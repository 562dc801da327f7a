"""Semantic segmentation (UperNet or a light FPN head on ConvNeXt): a task on the engine.

Data in the ADE20K layout (`DATA/images/{training,validation}/`, `DATA/annotations/{training,validation}/`,
optional `DATA/classes.txt`). Loss: per-pixel cross-entropy (ignore 255) plus 0.4 x the auxiliary head's;
evaluation: mIoU, mAcc and aAcc over every validation pixel, across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..preprocess import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from ..tasks import TaskSpec, lazy, register
from .config import DenseConfig, _fail
from .detection import DENSE_DEMO, DENSE_EVAL, DENSE_PREDICT
from .task import Task


@dataclass(frozen=True)
class SegmentConfig(DenseConfig):
    """Segmentation: the official ConvNeXt ADE20K recipe's optimiser (AdamW lr 1e-4 at batch 16, wd 0.05,
    stage-wise decay 0.9 when fine-tuning: pass --layer-decay 0.9); `input_size` is the crop size."""

    LAYER_DECAY_TYPES = ("stage_wise",)

    head: str = "upernet"  # upernet | fpn
    aux_head: bool = True
    head_dropout: float = 0.1  # the heads' Dropout2d before their classifiers (official 0.1)
    channels: int | None = None  # decode head width; None: UperNet 512 (official), FPN head 128
    input_size: int = 512
    scale: tuple[float, float] = (0.5, 2.0)  # random resize of the shorter side, x input_size
    reduce_zero_label: bool = False  # ADE20K: label 0 ("other") -> ignore, the rest shifted down
    num_classes: int | None = None  # None: classes.txt, else the largest label found + 1
    epochs: int = 50
    batch_size: int = 4
    lr_base: float = 1e-4
    warmup_epochs: float = 1.0
    layer_decay_type: str = "stage_wise"  # num_layers None: 6 for T, 12 for S/B/L/XL (the official configs)

    def __post_init__(self) -> None:
        from ..dense.segmentation import HEADS

        super().__post_init__()
        self._check_choices({"head": HEADS})
        if not 0 < self.scale[0] <= self.scale[1]:
            _fail(f"--scale must be two numbers 0 < min <= max, got {self.scale}")
        if not 0 <= self.head_dropout < 1:
            _fail(f"--head-dropout must be in [0, 1), got {self.head_dropout}")
        if self.channels is not None and self.channels < 1:
            _fail(f"--channels must be >= 1, got {self.channels}")
        if self.num_classes is not None and not 1 <= self.num_classes <= IGNORE_INDEX:
            _fail(f"--num-classes must be in 1..{IGNORE_INDEX}, got {self.num_classes}")


class SegmentationTask(Task):
    name = "segment"
    best_metric = "mIoU"
    higher_is_better = True
    sample_kind = "image"
    loss_names = ("loss_seg", "loss_aux")

    def __init__(self, cfg: SegmentConfig) -> None:
        super().__init__(cfg)
        if not cfg.aux_head:
            self.loss_names = ("loss_seg",)
        self.classes: list[str] = []

    def spec(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"model_name": cfg.model, "head": cfg.head, "aux_head": cfg.aux_head,
                "channels": cfg.channels, "classes": self.classes, "input_size": cfg.input_size,
                "reduce_zero_label": cfg.reduce_zero_label,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def datasets(self):
        from ..data import DataError
        from ..data.segdata import SegmentationFolder, read_classes, segmentation_transform

        cfg = self.cfg
        train = SegmentationFolder(cfg.data, "train", segmentation_transform(
            True, cfg.input_size, IMAGENET_MEAN, IMAGENET_STD, scale=cfg.scale, hflip=cfg.hflip,
            photometric=cfg.photometric), seed=cfg.seed, reduce_zero_label=cfg.reduce_zero_label)
        val = SegmentationFolder(cfg.data, "val", segmentation_transform(False, cfg.input_size, IMAGENET_MEAN,
                                                                         IMAGENET_STD),
                                 reduce_zero_label=cfg.reduce_zero_label)
        names = read_classes(Path(cfg.data))
        n = cfg.num_classes or (len(names) if names else max(train.max_label(), val.max_label()) + 1)
        if names and len(names) != n:
            raise DataError(f"{Path(cfg.data) / 'classes.txt'} names {len(names)} classes, --num-classes says {n}")
        self.classes = names or [str(i) for i in range(n)]
        return train, val

    def collate(self, items):
        from ..data.segdata import collate_segmentation

        return collate_segmentation(items)

    def build_model(self) -> nn.Module:
        from ..dense.segmentation import segmenter_from_spec

        return segmenter_from_spec(self.spec(), pretrained=self.cfg.pretrained, drop_path_rate=self.cfg.drop_path_rate,
                                   frozen_stages=self.cfg.frozen_stages, dropout=self.cfg.head_dropout)

    def param_groups(self, model: nn.Module) -> list[dict]:
        from .optim import dense_param_groups

        return dense_param_groups(model, self.cfg.weight_decay, self.cfg.layer_decay, self.cfg.layer_decay_type,
                                  self.cfg.num_layers)

    def loss(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        from ..data import DataError

        labelled = batch.targets[batch.targets != IGNORE_INDEX]
        if labelled.numel() and int(labelled.max()) >= len(self.classes):
            raise DataError(f"label {int(labelled.max())} in a training annotation, but there are "
                            f"{len(self.classes)} classes (0..{len(self.classes) - 1}; {IGNORE_INDEX} = ignore); "
                            f"set --num-classes or classes.txt")
        return model(batch.inputs, batch.targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        from ..eval.dense import evaluate_segmentation

        res = evaluate_segmentation(model, loader, device, len(self.classes), precision=self.cfg.precision,
                                    classes=self.classes, progress=progress)
        return {k: res[k] for k in ("mIoU", "mAcc", "aAcc")}

    def summary(self, train, val) -> str:
        return (f"{self.cfg.head} on {self.cfg.model}: {len(train)} train / {len(val)} val images, "
                f"{len(self.classes)} classes")

    def sample_name(self, dataset, index: int) -> str:
        return dataset.sample_name(index)

    def unreadable_reason(self, dataset, index: int) -> str:
        return dataset.unreadable_reason(index)


def _summarize(s: dict[str, Any]) -> str:
    shown = "  ".join(f"{k} {s[k]:.4f}" for k in ("mIoU", "mAcc", "train_loss") if k in s)
    return f"done: {s['model']} epoch {s.get('epoch', 0)}  {shown}  best {s['best_metric']} {s['best']:.4f}  -> {s['output']}"


def demo(output: str | None = None, epochs: int | None = None, backbone: str | None = None,
         scenes: int | None = None, force: bool = False) -> dict:
    """`convnext demo --task segment`: UperNet on convnext_atto, trained on generated scenes (Fashion-MNIST
    garments on photographs); see `train.scenes_demo.run`."""
    from .scenes_demo import run

    return run(SPEC, "demo_segment", output=output, epochs=epochs, backbone=backbone, scenes=scenes, force=force,
               metric="mIoU", what=lambda cfg: cfg.head, samples="images/validation")


SPEC = register(TaskSpec(
    name="segment", help="semantic segmentation (UperNet) on ADE20K-layout data",
    config=SegmentConfig, task=SegmentationTask, load=lazy("convnext.eval.dense:load_segmenter"),
    evaluate=lazy("convnext.eval.dense:evaluate_segmentation_checkpoint"),
    format_results=lazy("convnext.eval.dense:format_segmentation_results"),
    predictor=lazy("convnext.eval.dense:SegmentationPredictor"),
    format_predictions=lazy("convnext.eval.dense:format_dense_predictions"), summarize=_summarize, demo=demo,
    eval_options=DENSE_EVAL, predict_options=DENSE_PREDICT, demo_options=DENSE_DEMO, eval_batch_size=4,
))
