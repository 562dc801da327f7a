"""FCMAE pre-training (ConvNeXt V2): a task on the engine, no labels.

Data: every image under `--data`, at any depth. Each sample is a RandomResizedCrop (scale 0.2-1,
bicubic) + flip of an image and its random mask, both drawn from the sample's seed (seed, epoch,
index): bitwise resumable, and a 2-process run equals a 1-process run at the same global batch.
Evaluation: the reconstruction loss of a fixed set of "probe" images under fixed masks (a curve
that does not move with the random masks), and `reconstructions.png` of them each epoch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocess
from ..tasks import TaskSpec, opt, register
from ..utils import all_reduce_sum, autocast
from .config import EngineConfig, _fail
from .task import Task

if TYPE_CHECKING:
    from ..data import Batch, ImageFiles

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


def probe_transform(input_size: int) -> Any:
    """The fixed view of an image that evaluation reconstructs: resized to the square, no crop."""
    from ..data import eval_transform

    return eval_transform(Preprocess(input_size=input_size, crop_pct=1.0, interpolation="bicubic"))


@torch.no_grad()
def masked_loss(model: nn.Module, loader, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """The reconstruction loss over the masked patches of every image of `loader` (exact across processes)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, masked patches, images
    for batch in loader:
        if not len(batch):
            continue
        images, masks = batch.inputs.to(device), batch.targets.to(device)
        with autocast(device, precision):
            _, pred, _ = model(images, masks)
        m = masks.flatten(1).float()
        sums += torch.stack([(model.patch_losses(images, pred) * m).sum().double(), m.sum().double(),
                             torch.tensor(float(len(batch)), dtype=torch.float64, device=device)])
    all_reduce_sum(sums)
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "count": int(sums[2])}


class PretrainTask(Task):
    name = "pretrain"
    best_metric = "probe_loss"
    higher_is_better = False
    sample_kind = "image"

    def spec(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"model_name": cfg.model, "mask_ratio": cfg.mask_ratio, "mask_patch_size": cfg.mask_patch_size,
                "decoder_dim": cfg.decoder_dim, "decoder_depth": cfg.decoder_depth,
                "norm_pix_loss": cfg.norm_pix_loss, "in_chans": 3}

    def datasets(self) -> tuple[ImageFiles, ImageFiles]:
        from ..data import ImageFiles, train_transform

        cfg = self.cfg
        grid = cfg.input_size // cfg.mask_patch_size
        train = ImageFiles(cfg.data, seed=cfg.seed, cache=cfg.cache_images, transform=MaskedSample(train_transform(
            cfg.input_size, scale=cfg.scale, hflip=cfg.hflip, aa="none", color_jitter=0.0, reprob=0.0,
            interpolation_name=cfg.train_interpolation), grid, cfg.mask_ratio))
        k = min(cfg.probe_images, len(train))
        probe = train.subset([i * len(train) // k for i in range(k)],
                             MaskedSample(probe_transform(cfg.input_size), grid, cfg.mask_ratio))
        probe.seed = cfg.seed + 1  # fixed masks, not the training ones
        return train, probe

    def collate(self, items: list[Any]) -> Batch:
        return collate_masked(items)

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
        from .optim import build_param_groups

        return build_param_groups(model, self.cfg.weight_decay, skip_decay=lambda name, p: name.endswith(".bias")
                                  or (p.ndim <= 1 and ".grn." not in name))

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        loss, _, _ = model(batch.inputs, batch.targets)
        return {"loss": loss}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        return {"probe_loss": masked_loss(model, loader, device, self.cfg.precision)["loss"]}

    @torch.no_grad()
    def plot(self, model: nn.Module, probe: ImageFiles, device: torch.device) -> None:
        """reconstructions.png: input / masked / reconstruction / reconstruction + visible pixels, per probe image."""
        good = [probe[i] for i in range(len(probe))]
        good = [g for g in good if g[0] is not None]
        if good:
            plot_masked(model, torch.stack([g[0][0] for g in good]).to(device),
                        torch.stack([g[0][1] for g in good]).to(device), Path(self.cfg.output) / "reconstructions.png",
                        precision=self.cfg.precision,
                        title=f"{self.cfg.model}, mask ratio {self.cfg.mask_ratio}, {self.cfg.mask_patch_size}-px patches")

    def summary(self, train: ImageFiles, val: ImageFiles | None) -> str:
        cfg = self.cfg
        return (f"FCMAE on {cfg.model}: {len(train)} unlabelled images at {cfg.input_size} px, mask ratio "
                f"{cfg.mask_ratio} of {cfg.mask_patch_size}-px patches, decoder {cfg.decoder_depth} x {cfg.decoder_dim}")

    def sample_name(self, dataset: ImageFiles, index: int) -> str:
        return dataset.samples[index][0]

    def unreadable_reason(self, dataset: ImageFiles, index: int) -> str:
        from ..data import why_unreadable

        return why_unreadable(dataset.samples[index][0])


def collate_masked(items: list[Any]) -> Batch:
    """(image, mask) items -> Batch(images, masks): the pre-training batch."""
    from ..data import Batch

    good = [b for b in items if b[0] is not None]
    images = torch.stack([b[0][0] for b in good]) if good else None
    masks = torch.stack([b[0][1] for b in good]) if good else None
    return Batch(images, masks, [b[2] for b in good], [b[2] for b in items if b[0] is None])


def plot_masked(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, path: Path, *, precision: str = "fp32",
                title: str = "") -> None:
    """Input / masked / reconstruction / reconstruction + visible pixels of each image, as one PNG."""
    from ..plots import plot_reconstructions

    device = images.device
    with autocast(device, precision):
        _, pred, _ = model(images, masks)
    rec = model.reconstruct(images, pred)
    p = model.patch_size
    hidden = masks.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].to(images.dtype)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def show(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * std + mean).clamp(0, 1).cpu()

    plot_reconstructions({"input": show(images), "masked": show(images) * (1 - hidden.cpu()) + 0.5 * hidden.cpu(),
                          "reconstruction": show(rec), "rec. + visible": show(images * (1 - hidden) + rec * hidden)},
                         path, title=title)


def _dataset(model, data, input_size: int, seed: int):
    from ..data import ImageFiles

    if input_size % model.stride:
        raise ValueError(f"--input-size must be a multiple of {model.stride} (the encoder's stride), got {input_size}")
    return ImageFiles(data, seed=seed, transform=MaskedSample(probe_transform(input_size),
                                                              input_size // model.patch_size, model.mask_ratio))


def evaluate_checkpoint(checkpoint, data, *, batch_size: int = 64, workers: int = 0, precision: str = "fp32",
                        key: str | None = None, input_size: int = 224, seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """`convnext pretrain eval`: the reconstruction loss over the masked patches of every image under `data`
    (resized to `input_size`, masks drawn from `seed`: the same masks on every run)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..fcmae import load_fcmae_file

    model = load_fcmae_file(checkpoint, key=key)
    ds = _dataset(model, data, input_size, seed)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_masked)
    batches = tqdm(loader, desc="eval", disable=not progress, leave=False)
    return masked_loss(model, batches, torch.device("cpu"), precision) | {"model_name": model.model_name,
                                                                          "mask_ratio": model.mask_ratio}


class Predictor:
    """`convnext pretrain predict`: each image's reconstruction (`output/<stem>.png`: input / masked /
    reconstruction / reconstruction + visible) and its masked-patch loss."""

    batch_size = 1

    def __init__(self, checkpoint, paths: list, output, *, key: str | None = None, input_size: int = 224,
                 seed: int = 0, force: bool = False) -> None:
        from ..fcmae import load_fcmae_file
        from ..utils import check_output

        self.model = load_fcmae_file(checkpoint, key=key)
        self.out, self.input_size, self.seed = Path(output), input_size, seed
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--output {self.out} is a file; it must be a folder (created if missing)")
        from ..eval.predict import output_names

        self.names = {p: self.out / names[0] for p, names in output_names(paths).items()}
        for target in self.names.values():
            check_output(target, inputs=(*paths, checkpoint), force=force)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sample = MaskedSample(probe_transform(input_size), input_size // self.model.patch_size,
                                   self.model.mask_ratio)

    @torch.no_grad()
    def __call__(self, paths: list) -> list[dict[str, Any]]:
        from ..data import load_rgb
        from ..data.folder import seeded

        report = []
        for path in paths:
            try:
                x, mask = seeded(self.sample, self.seed, load_rgb(path))
            except Exception as e:  # noqa: BLE001 - reported per image; the others go on
                report.append({"path": str(path), "error": f"{type(e).__name__}: {e}"})
                continue
            images, masks = x[None], mask[None]
            _, pred, _ = self.model(images, masks)
            loss = float((self.model.patch_losses(images, pred) * masks.flatten(1)).sum() / masks.sum().clamp(min=1))
            self.names[path].parent.mkdir(parents=True, exist_ok=True)
            plot_masked(self.model, images, masks, self.names[path], title=f"loss {loss:.4f}")
            report.append({"path": str(path), "loss": loss, "output": str(self.names[path])})
        return report

    def finish(self) -> None:
        pass


def _format_results(res: dict[str, Any], style: str) -> str:
    import json

    if style == "json":
        return json.dumps(res)
    return (f"{res['model_name']} FCMAE: {res['count']} images, masked-patch reconstruction loss {res['loss']:.4f} "
            f"(mask ratio {res['mask_ratio']})")


def _format_predictions(results: list[dict[str, Any]], style: str) -> str:
    import json

    ok = [r for r in results if "error" not in r]
    if style == "json":
        return "\n".join(json.dumps(r) for r in ok)
    return "\n".join(f"{r['path']}: reconstruction loss {r['loss']:.4f}" for r in ok)


def _summarize(s: dict[str, Any]) -> str:
    shown = "  ".join(f"{k} {s[k]:.4f}" for k in ("train_loss", "probe_loss") if k in s)
    return f"done: {s['model']} epoch {s.get('epoch', 0)}  {shown}  best {s['best_metric']} {s['best']:.4f}  -> {s['output']}"


def labelled_subset(data: Path, out: Path, fraction: float = 0.1, seed: int = 0) -> Path:
    """`out/{train,val}`: a class-balanced `fraction` of data/train (fixed seed) and all of data/val, as hard links."""
    import shutil

    from ..data.folder import write_once

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


def demo(output: str | os.PathLike | None = None, epochs: int | None = None, pretrain_epochs: int | None = None,
         force: bool = False) -> dict:
    """`convnext demo --task fcmae`: FCMAE pre-training of convnextv2_atto on the 60,000 Fashion-MNIST training
    images without labels, then fine-tuning on 10% of the labels vs training from scratch on the same 6,000
    images for the same epochs; top-1 on the 10,000 test images, curves in fcmae_vs_scratch.png."""
    import json
    import time

    from ..data.fashion_mnist import prepare
    from ..plots import plot_comparison
    from ..utils import machine_line
    from .classification import ClassificationTask
    from .config import ClassifyConfig, recipe
    from .engine import fit

    t0 = time.perf_counter()
    out = Path(output or "runs/demo-fcmae")
    data = prepare(out / "data")
    labelled = labelled_subset(data, out / "data-10pct")
    pre_cfg = recipe("demo_fcmae_pretrain", PretrainConfig, epochs=pretrain_epochs, data=str(data / "train"),
                     output=str(out / "pretrain"), force=force)
    print(f"demo: FCMAE pre-training of {pre_cfg.model} on {data / 'train'} (labels unused), {pre_cfg.epochs} epochs")
    pre_summary = fit(PretrainTask(pre_cfg))
    runs = {}
    for name, extra in (("scratch", {}), ("fcmae", {"finetune": str(out / "pretrain" / "last.pt")})):
        cfg = recipe("demo_fcmae_finetune", ClassifyConfig, epochs=epochs, data=str(labelled), force=force,
                     output=str(out / name), **extra)
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
          f"{verdict}. {minutes:.1f} min {machine_line()}. "
          f"Outputs: {out} (fcmae_vs_scratch.png; pretrain/ with reconstructions.png; scratch/, fcmae/)")
    return result


def _load(checkpoint, key: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    from ..fcmae import load_fcmae_file

    model = load_fcmae_file(checkpoint, key=key)
    return model, model.spec()


_FCMAE_OPTIONS = (opt("--key", help="state dict key: model_ema for the EMA weights of a last.pt"),
                  opt("--input-size", type=int, default=224, help="images are resized to this square (default 224)"),
                  opt("--seed", type=int, default=0, help="seed of the masks (default 0)"))

SPEC = register(TaskSpec(
    name="pretrain", help="FCMAE self-supervised pre-training (ConvNeXt V2) on a folder of images",
    config=PretrainConfig, task=PretrainTask, load=_load, evaluate=evaluate_checkpoint,
    format_results=_format_results, predictor=Predictor, format_predictions=_format_predictions,
    summarize=_summarize, demo=demo, demo_name="fcmae",
    eval_options=_FCMAE_OPTIONS,
    predict_options=(opt("--output", required=True, help="folder for the reconstructions"),
                     opt("--force", action="store_true", help="overwrite existing files in --output"),
                     *_FCMAE_OPTIONS),
    demo_options=(opt("--pretrain-epochs", type=int, help="override the pre-training epochs"),),
    default_action="train",
))
