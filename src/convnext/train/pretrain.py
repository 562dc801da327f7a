"""FCMAE pre-training (ConvNeXt V2): a task on the engine, no labels.

Data: every image under `--data`, at any depth. Each sample is a RandomResizedCrop (scale 0.2-1,
bicubic) + flip of an image and its random mask, both drawn from the sample's seed (seed, epoch,
index): bitwise resumable, and a 2-process run equals a 1-process run at the same global batch.
Evaluation: the reconstruction loss of a fixed set of "probe" images under fixed masks (a curve
that does not move with the random masks), and `reconstructions.png` of them each epoch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import Batch, ImageFiles, train_transform, why_unreadable
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from .config import EngineConfig, _fail
from .task import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig(EngineConfig):
    """The official `main_pretrain.py` recipe: AdamW betas (0.9, 0.95), wd 0.05, lr = blr x batch / 256 with
    blr 1.5e-4, 40 warm-up epochs then cosine to 0, 800 epochs, RandomResizedCrop(0.2-1, bicubic) + flip."""

    model: str = "convnextv2_base"
    input_size: int = 224
    mask_ratio: float = 0.6
    mask_patch_size: int = 32  # 8 or 16 for small images (a multiple of the stem's 4 that divides 32)
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = False
    init: str = "default"  # default | official (the official FCMAE initialisation, see fcmae.init_official)
    pretrained: str | None = None  # continue from a pre-training model (ours / official FCMAE), or an encoder
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    train_interpolation: str = "bicubic"
    cache_images: bool = False
    probe_images: int = 8  # fixed images (evenly spread over the data) for probe_loss and reconstructions.png
    epochs: int = 800
    warmup_epochs: float = 40.0
    batch_size: int = 64
    lr_base: float = 1.5e-4  # flag --blr
    lr_base_batch: int = 256
    min_lr: float = 0.0
    opt_betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        from ..factory import check_model_name
        from ..fcmae import INITS
        from ..models.convnext import MODELS

        check_model_name(self.model)
        super().__post_init__()
        if not hasattr(MODELS[self.model][1], "depths"):
            _fail(f"--model {self.model} is isotropic; FCMAE pre-trains hierarchical ConvNeXts (convnextv2_*)")
        if self.input_size % 32:
            _fail(f"--input-size must be a multiple of 32 (the encoder's stride), got {self.input_size}")
        if not 0 < self.mask_ratio < 1:
            _fail(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size not in (4, 8, 16, 32):
            _fail(f"--mask-patch-size must be 4, 8, 16 or 32 (a multiple of the stem's 4 that divides 32), "
                  f"got {self.mask_patch_size}")
        if self.decoder_dim < 1 or self.decoder_depth < 0 or self.probe_images < 1:
            _fail("--decoder-dim and --probe-images must be >= 1, --decoder-depth >= 0")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            _fail(f"--scale must be two numbers 0 < min <= max <= 1, got {self.scale}")
        if self.layer_decay != 1.0:
            _fail("--layer-decay is for fine-tuning; pre-training trains every layer at the same rate")
        if self.fsdp:
            _fail("--fsdp is for classification; pre-training runs with DDP (--nproc)")
        self._check_choices({"init": INITS, "train_interpolation": INTERPOLATIONS})


class MaskedSample:
    """An image -> (augmented tensor, random mask), both from the sample's seeded generator."""

    def __init__(self, transform, grid: int, ratio: float) -> None:
        self.transform, self.grid, self.ratio = transform, grid, ratio

    def __call__(self, img):
        from ..fcmae import random_mask

        x = self.transform(img)
        return x, random_mask(1, (self.grid, self.grid), self.ratio)[0]


class PretrainTask(Task):
    best_metric = "probe_loss"
    higher_is_better = False
    sample_kind = "image"

    def spec(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"model": cfg.model, "mask_ratio": cfg.mask_ratio, "mask_patch_size": cfg.mask_patch_size,
                "decoder_dim": cfg.decoder_dim, "decoder_depth": cfg.decoder_depth,
                "norm_pix_loss": cfg.norm_pix_loss, "in_chans": 3}

    def datasets(self, world_size: int) -> tuple[ImageFiles, ImageFiles]:
        from ..data.transforms import eval_transform
        from ..preprocess import Preprocess

        cfg = self.cfg
        grid = cfg.input_size // cfg.mask_patch_size
        train = ImageFiles(cfg.data, seed=cfg.seed, cache=cfg.cache_images, transform=MaskedSample(train_transform(
            cfg.input_size, scale=cfg.scale, hflip=cfg.hflip, aa="none", color_jitter=0.0, reprob=0.0,
            interpolation_name=cfg.train_interpolation), grid, cfg.mask_ratio))
        k = min(cfg.probe_images, len(train))
        probe_tf = eval_transform(Preprocess(input_size=cfg.input_size, crop_pct=1.0, interpolation="bicubic"))
        probe = train.subset([i * len(train) // k for i in range(k)], MaskedSample(probe_tf, grid, cfg.mask_ratio))
        probe.seed = cfg.seed + 1  # fixed masks, not the training ones
        return train, probe

    def collate(self, items: list[Any]) -> Batch:
        good = [b for b in items if b[0] is not None]
        images = torch.stack([b[0][0] for b in good]) if good else None
        masks = torch.stack([b[0][1] for b in good]) if good else None
        return Batch(images, masks, [b[2] for b in good], [b[2] for b in items if b[0] is None])

    def build_model(self) -> nn.Module:
        from ..fcmae import create_fcmae

        cfg = self.cfg
        return create_fcmae(cfg.model, mask_ratio=cfg.mask_ratio, mask_patch_size=cfg.mask_patch_size,
                            decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                            norm_pix_loss=cfg.norm_pix_loss, pretrained=cfg.pretrained, init=cfg.init,
                            drop_path_rate=cfg.drop_path_rate)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """As the official `add_weight_decay`: no decay on biases and norms (1-D there); GRN's (1, C) parameters
        and the mask token are decayed."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or (p.ndim <= 1 and ".grn." not in name) else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        images = batch.inputs.to(device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss, _, _ = model(images, batch.targets.to(device, non_blocking=True))
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        from ..utils import autocast

        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in loader:
            if not len(batch):
                continue
            images, masks = batch.inputs.to(device), batch.targets.to(device)
            with autocast(device, self.cfg.precision):
                _, pred, _ = model(images, masks)
            m = masks.flatten(1).float()
            sums += torch.stack([(model.patch_losses(images, pred) * m).sum(), m.sum()]).double().cpu()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.to(device)
            torch.distributed.all_reduce(sums)
            rank = torch.distributed.get_rank()
        else:
            rank = 0
        if rank == 0:
            self.plot(model, loader.dataset, device)
        return {"probe_loss": float(sums[0] / sums[1].clamp(min=1))}

    def plot(self, model: nn.Module, probe: ImageFiles, device: torch.device) -> None:
        """reconstructions.png: input / masked / reconstruction / reconstruction + visible pixels, per probe image."""
        from ..plots import plot_reconstructions
        from ..utils import autocast

        good = [probe[i] for i in range(len(probe))]
        good = [g for g in good if g[0] is not None]
        if not good:
            return
        images = torch.stack([g[0][0] for g in good]).to(device)
        masks = torch.stack([g[0][1] for g in good]).to(device)
        with autocast(device, self.cfg.precision):
            _, pred, _ = model(images, masks)
        rec = model.reconstruct(images, pred)
        p = self.cfg.mask_patch_size
        hidden = masks.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].to(images.dtype)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

        def show(x: torch.Tensor) -> torch.Tensor:
            return (x.float() * std + mean).clamp(0, 1).cpu()

        plot_reconstructions({"input": show(images), "masked": show(images) * (1 - hidden.cpu()) + 0.5 * hidden.cpu(),
                              "reconstruction": show(rec),
                              "rec. + visible": show(images * (1 - hidden) + rec * hidden)},
                             Path(self.cfg.output) / "reconstructions.png",
                             title=f"{self.cfg.model}, mask ratio {self.cfg.mask_ratio}, {p}-px patches")

    def identity(self) -> dict[str, Any]:
        return {"model_name": self.cfg.model, "fcmae": self.spec()}

    def summary(self, train: ImageFiles, val: ImageFiles | None) -> str:
        cfg = self.cfg
        return (f"FCMAE on {cfg.model}: {len(train)} unlabelled images at {cfg.input_size} px, mask ratio "
                f"{cfg.mask_ratio} of {cfg.mask_patch_size}-px patches, decoder {cfg.decoder_depth} x {cfg.decoder_dim}")

    def save_best(self, model: nn.Module, state_dict: dict[str, torch.Tensor], output: Path, epoch: int,
                  metrics: dict[str, float]) -> None:
        from ..fcmae import FORMAT_TAG
        from ..weights import write_safetensors

        write_safetensors(output / "best.safetensors", state_dict, {
            "format": FORMAT_TAG, "fcmae": json.dumps(self.spec()), "epoch": str(epoch),
            "probe_loss": f"{metrics['probe_loss']:.6g}"})

    def sample_name(self, dataset: ImageFiles, index: int) -> str:
        return dataset.samples[index][0]

    def unreadable_reason(self, dataset: ImageFiles, index: int) -> str:
        return why_unreadable(dataset.samples[index][0])
