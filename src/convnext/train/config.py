"""Training configuration: one frozen dataclass; defaults < YAML (`--config`) < command-line flags.

Field names are the YAML keys; flags are the same names with dashes (`batch_size` -> `--batch-size`),
following timm's spelling. Defaults are the official ConvNeXt `main.py` ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train, on what ---
    model: str = "convnext_tiny"
    data: str = ""  # ImageNet-style root: DATA/train/<class>/*, DATA/val/<class>/*
    output: str = "runs/train"
    finetune: str | None = None  # checkpoint (any supported format) to start from; head re-initialised if classes differ
    input_size: int = 224
    drop_path: float = 0.0  # official: T 0.1, S 0.4, B/L 0.5 from scratch on IN-1K
    head_init_scale: float = 1.0  # 0.001 for fine-tuning (official)
    # --- optimisation (official main.py defaults) ---
    epochs: int = 300
    batch_size: int = 64  # per process; the effective batch is batch_size * grad_accum * world size
    grad_accum: int = 1  # official `update_freq`
    lr: float | None = None  # None: lr_base * effective_batch / lr_base_batch
    lr_base: float = 4e-3  # official peak lr at total batch 4096
    lr_base_batch: int = 4096
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05  # AdamW; none on biases, norms, LayerScale and GRN parameters
    opt_eps: float = 1e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None  # max global grad norm
    layer_decay: float = 1.0  # layer-wise lr decay (fine-tuning: 0.7-0.9); 1.0 = off
    layer_decay_type: str = "group"  # V1 "group" (12 groups of 3 blocks) or V2 "single" (one per block)
    # --- augmentation and regularisation ---
    aa: str = "rand-m9-mstd0.5-inc1"  # RandAugment spec; "none" turns it off (then color jitter applies)
    color_jitter: float = 0.4
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    reprob: float = 0.25  # random erasing probability
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    train_interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, center crop (no crop at >= 384)
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    # --- runtime ---
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 + GradScaler on CUDA only)
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2 fully_shard), per stage
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    workers: int = 2  # DataLoader processes; each competes with torch threads for cores
    cache_images: bool = False  # keep decoded images in RAM (small datasets; per loader process)
    threads: int | None = None  # torch intra-op threads; None: cores minus workers (at least 1)
    resume: str | None = None  # "auto" (newest complete checkpoint in --output) or a checkpoint path
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0: once per epoch)
    keep_checkpoints: int = 2
    nan_policy: str = "abort"  # abort | skip: what a non-finite loss does
    bad_images: str = "skip"  # skip | error: what an unreadable image does
    eval_every: int = 1  # epochs between evaluations (always after the last)
    log_every: int = 50  # steps between progress-bar metric updates
    progress: bool = True  # tqdm bars (rank 0 only)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        from ..factory import check_model_name

        check_model_name(self.model)
        if not self.data:
            bad("--data is required: a folder with train/<class>/* and val/<class>/*")
        if self.lr is not None and not (finite(self.lr) and self.lr > 0):
            bad(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("lr_base", "min_lr", "weight_decay", "opt_eps", "smoothing", "mixup", "cutmix"):
            v = getattr(self, name)
            if not finite(v) or v < 0:
                bad(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.epochs < 1:
            bad(f"--epochs must be >= 1, got {self.epochs}")
        if not (finite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            bad(f"--warmup-epochs must be >= 0 and < --epochs ({self.epochs}), got {self.warmup_epochs}")
        for name in ("batch_size", "grad_accum", "lr_base_batch", "eval_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.input_size < 32:
            bad(f"--input-size must be >= 32 (the network downsamples 32x), got {self.input_size}")
        if not 0 <= self.drop_path < 1:
            bad(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.smoothing >= 1:
            bad(f"--smoothing must be < 1, got {self.smoothing}")
        for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            bad(f"--scale must be two numbers 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.crop_pct <= 1:
            bad(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if not 0 < self.layer_decay <= 1:
            bad(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad is not None and not (finite(self.clip_grad) and self.clip_grad > 0):
            bad(f"--clip-grad must be > 0, got {self.clip_grad}")
        if not 0 <= self.model_ema_decay < 1:
            bad(f"--model-ema-decay must be in [0, 1), got {self.model_ema_decay}")
        if self.workers < 0 or (self.threads is not None and self.threads < 1):
            bad("--workers must be >= 0 and --threads >= 1")
        if self.save_every_steps < 0:
            bad(f"--save-every-steps must be >= 0, got {self.save_every_steps}")
        choices = {"precision": ("fp32", "bf16", "fp16"), "device": ("auto", "cpu", "cuda"),
                   "nan_policy": ("abort", "skip"), "bad_images": ("skip", "error"),
                   "layer_decay_type": ("group", "single"), "train_interpolation": ("bicubic", "bilinear", "nearest")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples): for YAML and for weights_only checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """A YAML/CLI value converted to the field's type, with an error naming the key."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if typing.get_origin(hint) is tuple:
            seq = value.split(",") if isinstance(value, str) else list(value)
            inner = typing.get_args(hint)
            if len(seq) != len(inner):
                raise ValueError
            return tuple(t(v) for t, v in zip(inner, seq))
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot use {value!r} as {getattr(hint, '__name__', hint)}") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _HINTS:
            import difflib

            close = difflib.get_close_matches(name, list(_HINTS), n=1)
            raise ValueError(f"{path}: unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        out[name] = _coerce(name, value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, default None so that only given flags override YAML."""
    parser.add_argument("--config", help="YAML recipe (e.g. configs/demo.yaml); flags override it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = _HINTS[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {default})")
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, nargs=len(typing.get_args(hint)), default=None, metavar="V",
                                help=f"(default: {' '.join(map(str, default))})")
        else:
            parser.add_argument(flag, default=None, help=f"(default: {default})")


def from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = _coerce(f.name, v)
    return TrainConfig(**values)


def save_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    from ..weights.io import atomic_write

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


__all__ = ["TrainConfig", "add_arguments", "from_args", "load_yaml", "save_yaml"]
