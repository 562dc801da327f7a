"""Object detection (Mask R-CNN, Cascade Mask R-CNN, Faster R-CNN, RetinaNet, FCOS on ConvNeXt + FPN): a task on
the engine.

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

from ..tasks import TaskSpec, lazy, opt, register
from .config import DenseConfig, _fail
from .task import Task


@dataclass(frozen=True)
class DetectConfig(DenseConfig):
    """Detection: the official ConvNeXt COCO recipe's optimiser (AdamW lr 2e-4 at batch 16, wd 0.05,
    layer-wise decay) with multi-scale training; `input_size` is the shorter image side (torchvision's
    `min_size`)."""

    LAYER_DECAY_TYPES = ("layer_wise",)

    arch: str = "maskrcnn"  # maskrcnn | cascade_maskrcnn | fasterrcnn | retinanet | fcos
    conventions: str = "torchvision"  # or mmdet: the official configs' anchors, box coder, RoIAlign, test settings
    input_size: int = 800  # shorter side at evaluation (and the largest in multi-scale training)
    max_size: int | None = None  # longer side limit; None: input_size * 1333 / 800 (torchvision's ratio)
    ms_scale: tuple[float, float] = (0.6, 1.0)  # multi-scale training: shorter sides in this range x input_size
    ms_sizes: int = 5  # how many, evenly spaced (the official COCO configs: 11, 480 to 800 every 32)
    train_ann: str | None = None  # default DATA/annotations/instances_train.json
    train_images: str | None = None  # default DATA/train
    val_ann: str | None = None
    val_images: str | None = None
    # head sizes (None: chosen from input_size, see dense.head_defaults)
    proposals: int | None = None  # RPN proposals kept per image in training
    rois_per_image: int | None = None  # RoIs sampled per image for the box head
    box_head_width: int | None = None
    fpn_channels: int = 256  # 128 halves a CPU training step on small images
    crop: float = 0.5  # probability of a random crop
    crop_policy: str = "iou"  # iou: torchvision's RandomIoUCrop; detr: the official configs' (data.coco)
    # optimisation: official COCO 3x recipe's AdamW
    epochs: int = 36
    batch_size: int = 2
    lr_base: float = 2e-4
    warmup_epochs: float = 0.25
    layer_decay_type: str = "layer_wise"  # num_layers None: 6 for T, 12 for S/B/L/XL (official)

    def __post_init__(self) -> None:
        from ..dense.detection import ARCHS, RCNN_ARCHS

        super().__post_init__()
        from ..data.coco import CROP_POLICIES

        self._check_choices({"arch": ARCHS, "conventions": ("torchvision", "mmdet"), "crop_policy": CROP_POLICIES})
        if self.conventions == "mmdet" and self.arch not in RCNN_ARCHS:
            _fail(f"--conventions mmdet is for the R-CNNs ({', '.join(RCNN_ARCHS)}), not --arch {self.arch}")
        if not 0 < self.ms_scale[0] <= self.ms_scale[1] <= 1:
            _fail(f"--ms-scale must be two numbers 0 < min <= max <= 1, got {self.ms_scale}")
        if self.ms_sizes < 1:
            _fail(f"--ms-sizes must be >= 1, got {self.ms_sizes}")
        if not 0 <= self.crop <= 1:
            _fail(f"--crop must be in [0, 1], got {self.crop}")
        if self.arch == "fcos" and (self.fpn_channels % 32 or self.fpn_channels < 64):
            _fail(f"--arch fcos normalises its head with GroupNorm(32 groups): --fpn-channels must be a multiple of "
                  f"32 and at least 64, got {self.fpn_channels}")
        for name in ("fpn_channels", "proposals", "rois_per_image", "box_head_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

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
    name = "detect"
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
        return {"model_name": cfg.model, "arch": cfg.arch, "conventions": cfg.conventions, "classes": self.classes,
                "cat_ids": self.cat_ids, "min_size": cfg.input_size,
                "train_sizes": list(train_sizes(cfg.input_size, cfg.ms_scale, cfg.ms_sizes)),
                "max_size": cfg.max_size or math.ceil(cfg.input_size * 1333 / 800), "options": options}

    def datasets(self):
        from ..data.coco import CocoDetection, detection_transform

        cfg, f = self.cfg, self.cfg.files()
        from ..dense.detection import MASK_ARCHS

        masks = cfg.arch in MASK_ARCHS
        train = CocoDetection(f["train_ann"], f["train_images"], detection_transform(
            True, hflip=cfg.hflip, crop=cfg.crop, photometric=cfg.photometric, crop_policy=cfg.crop_policy,
            input_size=cfg.input_size), seed=cfg.seed, masks=masks)
        val = CocoDetection(f["val_ann"], f["val_images"], detection_transform(False), masks=masks,
                            cat_ids=train.cat_ids)
        self.classes, self.cat_ids = train.classes, train.cat_ids
        return train, val

    def collate(self, items):
        from ..data.coco import collate_detection

        return collate_detection(items)

    def build_model(self) -> nn.Module:
        from ..dense.detection import detector_from_spec

        return detector_from_spec(self.spec(), pretrained=self.cfg.pretrained, drop_path_rate=self.cfg.drop_path_rate,
                                  frozen_stages=self.cfg.frozen_stages)

    def param_groups(self, model: nn.Module) -> list[dict]:
        from ..factory import create_model
        from .optim import dense_param_groups

        with torch.device("meta"):
            depths = create_model(self.cfg.model).cfg.depths
        return dense_param_groups(model, self.cfg.weight_decay, self.cfg.layer_decay, self.cfg.layer_decay_type,
                                  self.cfg.num_layers, depths)

    def loss(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        losses = model(list(batch.inputs), list(batch.targets))
        return {k: losses[k].float() for k in self.loss_names}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        from ..dense.detection import MASK_ARCHS
        from ..eval.dense import evaluate_detection

        res = evaluate_detection(model, loader, device, loader.dataset, precision=self.cfg.precision,
                                 masks=self.cfg.arch in MASK_ARCHS, progress=progress)
        return {k: v for k, v in res.items() if k != "bad_images"}

    def summary(self, train, val) -> str:
        return (f"{self.cfg.arch} on {self.cfg.model}: {len(train)} train / {len(val)} val images, "
                f"{len(self.classes)} classes")

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


def _summarize(s: dict[str, Any]) -> str:
    shown = "  ".join(f"{k} {s[k]:.4f}" for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50", "train_loss")
                      if k in s)
    return f"done: {s['model']} epoch {s.get('epoch', 0)}  {shown}  best {s['best_metric']} {s['best']:.4f}  -> {s['output']}"


_ARCH_NAMES = {"maskrcnn": "Mask R-CNN", "cascade_maskrcnn": "Cascade Mask R-CNN", "fasterrcnn": "Faster R-CNN",
               "retinanet": "RetinaNet", "fcos": "FCOS"}


def demo(output: str | None = None, epochs: int | None = None, backbone: str | None = None,
         scenes: int | None = None, force: bool = False, arch: str | None = None) -> dict:
    """`convnext demo --task detect`: Mask R-CNN (or `arch`) on convnext_atto, trained on generated scenes
    (Fashion-MNIST garments on photographs); see `train.scenes_demo.run`."""
    from .scenes_demo import run

    return run(SPEC, "demo_detect", output=output, epochs=epochs, backbone=backbone, scenes=scenes, force=force,
               metric="bbox_mAP_50", what=lambda cfg: f"{cfg.arch} ({_ARCH_NAMES.get(cfg.arch, cfg.arch)})",
               samples="val", predict_options={"score_threshold": 0.3}, overrides={"arch": arch} if arch else None)


DENSE_EVAL = (opt("--key", help="state dict key: model_ema for the EMA weights of a last.pt"),
              opt("--ema", dest="key", action="store_const", const="model_ema", help="the EMA weights of a last.pt"))
DENSE_PREDICT = (opt("--output", required=True, help="folder for the drawn images and results"),
                 opt("--force", action="store_true", help="overwrite existing files in --output"), *DENSE_EVAL)
DENSE_DEMO = (opt("--backbone", help="initialise the backbone from this checkpoint (e.g. runs/demo/train/best.safetensors)"),
              opt("--scenes", type=int, help="number of training scenes to generate"))

SPEC = register(TaskSpec(
    name="detect", help="object detection and instance segmentation (Mask/Cascade Mask/Faster R-CNN, RetinaNet, FCOS) on "
                        "COCO-format data",
    config=DetectConfig, task=DetectionTask, load=lazy("convnext.eval.dense:load_detector"),
    evaluate=lazy("convnext.eval.dense:evaluate_detection_checkpoint"),
    format_results=lazy("convnext.eval.dense:format_detection_results"),
    predictor=lazy("convnext.eval.dense:DetectionPredictor"),
    format_predictions=lazy("convnext.eval.dense:format_dense_predictions"), summarize=_summarize, demo=demo,
    eval_options=(opt("--val-ann", help="annotation file (default: DATA/annotations/instances_val.json)"),
                  opt("--val-images", help="image folder (default: DATA/val)"), *DENSE_EVAL),
    predict_options=(*DENSE_PREDICT, opt("--score-threshold", type=float, default=0.5,
                                         help="detections below are not kept")),
    demo_options=(*DENSE_DEMO, opt("--arch", help="--task detect: the detector (maskrcnn, cascade_maskrcnn, "
                                                    "fasterrcnn, retinanet, fcos; default maskrcnn)")),
    eval_batch_size=4,
))
