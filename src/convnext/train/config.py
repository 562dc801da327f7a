"""Training configuration: frozen dataclasses; defaults < YAML (`--config`) < command-line flags.

`EngineConfig` holds what every task shares (optimisation, schedule, runtime, checkpoints);
each task extends it with its own fields (`ClassifyConfig` for classification, `DenseConfig` for what
detection and segmentation share). Field names are
the YAML keys; flags are the same names with dashes (`batch_size` -> `--batch-size`), following
timm's spelling. Defaults are the official ConvNeXt `main.py` ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..preprocess import DECODE_MODES, INTERPOLATIONS
from ..utils import PRECISIONS, atomic_write, inside

logger = logging.getLogger(__name__)

# Flags kept under timm's spelling where the field has a longer name.
FLAG_ALIASES = {"drop_path_rate": ("--drop-path",), "lr_base": ("--blr",)}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class EngineConfig:
    """What the training engine needs, whatever the task."""

    LAYER_DECAY_TYPES = ("group", "single")  # (a class attribute, not a field) the task's layer-decay rules

    # --- what to train, on what ---
    model: str = "convnext_tiny"  # the task's model (each task config checks the name)
    data: str = ""  # the task's dataset root
    output: str = "runs/train"
    input_size: int = 224
    drop_path_rate: float = 0.0  # stochastic depth (flag --drop-path); official: T 0.1, S 0.4, B/L 0.5 on IN-1K
    # --- optimisation (official main.py defaults) ---
    epochs: int = 300
    batch_size: int = 64  # per process; the effective batch is batch_size * grad_accum * world size
    grad_accum: int = 1  # official `update_freq`
    lr: float | None = None  # None: lr_base * effective_batch / lr_base_batch
    lr_base: float = 4e-3  # official peak lr at total batch 4096
    lr_base_batch: int = 4096
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    warmup_iters: int | None = None  # warm-up in optimizer steps instead (the det/seg configs: 500 / 1500)
    schedule: str = "cosine"  # cosine (classification) | poly (ADE20K) | step (COCO: x0.1 at --lr-steps epochs)
    lr_steps: tuple[int, ...] = ()  # step schedule: the epochs where the lr drops by 10 (COCO 3x: 27, 33)
    warmup_ratio: float = 0.0  # poly/step: warm-up starts at this fraction of the lr (mmcv; 1e-6 seg, 1e-3 det)
    weight_decay: float = 0.05  # AdamW; none on biases, norms, LayerScale and GRN parameters
    opt_eps: float = 1e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None  # max global grad norm
    layer_decay: float = 1.0  # layer-wise lr decay (fine-tuning: 0.7-0.9); 1.0 = off
    layer_decay_type: str = "group"  # V1 "group" (12 groups of 3 blocks) or V2 "single" (one per block)
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    # --- runtime ---
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 + GradScaler on CUDA only) | auto (bf16 where measured faster)
    channels_last: bool = False
    compile: bool = False  # time eager vs torch.compile on the first batch, keep the faster (recorded for a resume)
    grad_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2 fully_shard), per stage
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    workers: int = 2  # DataLoader processes; each competes with torch threads for cores
    threads: int | None = None  # torch intra-op threads, fixed; None (or "auto"): cores minus workers, governed
    # by the step time while the CPU is shared (`train.governor`)
    resume: str | None = None  # "auto" (newest complete checkpoint in --output) or a checkpoint path
    force: bool = False  # start over in an --output that holds an earlier run (its checkpoints are deleted)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0: once per epoch)
    keep_checkpoints: int = 2
    nan_policy: str = "abort"  # abort | skip: what a non-finite loss does
    bad_images: str = "skip"  # skip | error: what an unreadable sample does
    max_bad_fraction: float = 0.5  # an epoch with more unreadable samples than this share (or no usable one) fails
    resume_anyway: bool = False  # resume a checkpoint although its data, batch or seed differ (logged)
    eval_every: int = 1  # epochs between evaluations (always after the last)
    log_every: int = 50  # steps between per-step metrics (progress bar, --log-to trackers)
    log_to: str = ""  # trackers beside metrics.jsonl and summary.csv: tensorboard,wandb,mlflow,csv (any subset)
    project: str = "convnext"  # the W&B project / MLflow experiment (WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME win)
    progress: bool = True  # tqdm bars (rank 0 only)

    def __post_init__(self) -> None:
        if not self.data:
            _fail("--data is required: the dataset folder")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            _fail(f"--output {self.output} is a file; it must be a folder (created if missing)")
        if Path(self.data).is_dir() and inside(self.output, self.data):
            _fail(f"--output {self.output} is inside --data {self.data}: what the run writes would become its data")
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {self.resume} (or use --resume auto)")
        if self.lr is not None and not (_finite(self.lr) and self.lr > 0):
            _fail(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("lr_base", "min_lr", "weight_decay", "opt_eps"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                _fail(f"{_flag(name)} must be a finite number >= 0, got {getattr(self, name)}")
        if self.epochs < 1:
            _fail(f"--epochs must be >= 1, got {self.epochs}")
        if not (_finite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            _fail(f"--warmup-epochs must be >= 0 and < --epochs ({self.epochs}), got {self.warmup_epochs}")
        for name in ("batch_size", "grad_accum", "lr_base_batch", "eval_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                _fail(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.input_size < 32:
            _fail(f"--input-size must be >= 32 (the network downsamples 32x), got {self.input_size}")
        if not 0 <= self.drop_path_rate < 1:
            _fail(f"--drop-path must be in [0, 1), got {self.drop_path_rate}")
        if not 0 < self.layer_decay <= 1:
            _fail(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad is not None and not (_finite(self.clip_grad) and self.clip_grad > 0):
            _fail(f"--clip-grad must be > 0, got {self.clip_grad}")
        if not 0 <= self.model_ema_decay < 1:
            _fail(f"--model-ema-decay must be in [0, 1), got {self.model_ema_decay}")
        if self.workers < 0 or (self.threads is not None and self.threads < 1):
            _fail("--workers must be >= 0 and --threads >= 1")
        if not (_finite(self.max_bad_fraction) and 0 <= self.max_bad_fraction <= 1):
            _fail(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.save_every_steps < 0:
            _fail(f"--save-every-steps must be >= 0, got {self.save_every_steps}")
        self._check_choices({"precision": (*PRECISIONS, "auto"), "device": ("auto", "cpu", "cuda"),
                             "nan_policy": ("abort", "skip"), "bad_images": ("skip", "error"),
                             "layer_decay_type": self.LAYER_DECAY_TYPES, "schedule": ("cosine", "poly", "step")})
        self._check_schedule()
        from .tracking import parse_log_to

        parse_log_to(self.log_to)  # an unknown tracker, or one not installed: one line, before any work

    def _check_schedule(self) -> None:
        if self.warmup_iters is not None and self.warmup_iters < 0:
            _fail(f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        if not (_finite(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1):
            _fail(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.lr_steps and self.schedule != "step":
            _fail("--lr-steps are the milestones of --schedule step")
        if self.schedule == "step" and not (self.lr_steps and all(0 < m < self.epochs for m in self.lr_steps)
                                            and list(self.lr_steps) == sorted(set(self.lr_steps))):
            _fail(f"--schedule step needs --lr-steps: increasing epochs between 0 and --epochs ({self.epochs}), got "
                  f"{list(self.lr_steps)}")
        if self.schedule == "cosine" and self.warmup_ratio:
            _fail("--warmup-ratio is for the poly and step schedules (the cosine warm-up starts at 0, as the official "
                  "classification code)")

    def _check_choices(self, choices: dict[str, tuple[str, ...]]) -> None:
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples): for YAML and for weights_only checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ClassifyConfig(EngineConfig):
    """Image classification: the ConvNeXt ImageNet recipe (data: DATA/train/<class>/*, DATA/val/<class>/* (or
    DATA/validation/), any folder with `labels` and `val_labels` files listing its images, or `hf:PATH_OR_NAME`,
    a Hugging Face dataset, or `wds:DIR`, WebDataset shards: their `train_split` and `val_split`)."""

    labels: str | None = None  # CSV (filename|path,label) or JSONL of the training images, paths relative to data
    val_labels: str | None = None  # the same for the validation images (with `labels`)
    train_split: str = "train"  # the split (sub-folder, or hf: split) trained on
    val_split: str = "validation"  # ... and evaluated on ("validation" also finds "val")
    image_key: str | None = None  # hf: the image column (default: the Image feature), wds: extensions ("jpg;png")
    label_key: str | None = None  # hf: the label column (default: ClassLabel, else "label"), wds: "cls" or "json"
    finetune: str | None = None  # checkpoint (any supported format) to start from; head re-initialised if classes differ
    head_init_scale: float = 1.0  # 0.001 for fine-tuning (official)
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
    cache_images: bool = False  # keep decoded images in RAM (small datasets; per loader process)
    sample_order: str = "random"  # random (a permutation of all samples each epoch) or shards (wds: one shard after
    #                               another, each shuffled within: sequential-ish reads on network file systems)
    decode: str = "cpu"  # training images: cpu (PIL, whole), cpu-draft (JPEGs decoded reduced when the crop allows),
    #                      gpu (JPEGs decoded and augmented on the CUDA device, a batch at a time)
    multi_label: bool = False  # several classes per image (labels files `a;b` / JSON lists, hf: lists, wds: .json
    #                            lists or .cls `1;4`): BCE, mAP and F1
    # --- imbalanced data ---
    class_weights: str | None = None  # auto (n / (classes x count), sklearn's "balanced") or a file: one per class
    balanced_sampler: bool = False  # draw each epoch's samples with probability 1 / their class's count

    def __post_init__(self) -> None:
        from ..factory import check_model_name

        check_model_name(self.model)
        super().__post_init__()
        if (self.labels is None) != (self.val_labels is None):
            _fail("--labels and --val-labels go together: the training and the validation images' labels files")
        if self.multi_label and self.labels is None and not self.data.startswith(("hf:", "wds:")):
            _fail("--multi-label reads several classes per image from --labels / --val-labels files (`a;b` or a "
                  "JSON list), an hf: list column or wds: .json lists; class folders hold one")
        if self.multi_label and self.balanced_sampler:
            _fail("--balanced-sampler draws by one class per image; with --multi-label use --class-weights")
        if self.class_weights not in (None, "auto") and not Path(self.class_weights).is_file():
            _fail(f"--class-weights {self.class_weights}: auto, or a file of one weight per class")
        if self.data.startswith(("hf:", "wds:")) and self.labels is not None:
            _fail("--labels names the images of a folder; an hf: dataset or wds: shards have their labels (--label-key)")
        for name in ("smoothing", "mixup", "cutmix"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                _fail(f"{_flag(name)} must be a finite number >= 0, got {getattr(self, name)}")
        if self.smoothing >= 1:
            _fail(f"--smoothing must be < 1, got {self.smoothing}")
        for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                _fail(f"{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            _fail(f"--scale must be two numbers 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.crop_pct <= 1:
            _fail(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        self._check_choices({"train_interpolation": INTERPOLATIONS, "decode": DECODE_MODES,
                             "sample_order": ("random", "shards")})
        if self.sample_order == "shards" and not self.data.startswith("wds:"):
            _fail("--sample-order shards visits WebDataset shards one after another: it needs --data wds:DIR")
        if self.sample_order == "shards" and self.balanced_sampler:
            _fail("--balanced-sampler draws samples by class weight; --sample-order shards by shard: choose one")
        if self.decode != "cpu" and self.cache_images:
            _fail(f"--cache-images keeps decoded images, which --decode {self.decode} does not make: drop one of them")


TrainConfig = ClassifyConfig  # the name before the task registry (kept for existing code)


@dataclass(frozen=True)
class DenseConfig(EngineConfig):
    """What detection and segmentation share: a backbone (from `pretrained`), flips and photometric
    distortion, the official det/seg AdamW (lr at batch 16, no min lr) with layer-wise decay."""

    model: str = "convnext_tiny"
    pretrained: str | None = None  # backbone weights: any checkpoint create_model loads, or an official det/seg file
    frozen_stages: int = -1
    hflip: float = 0.5
    photometric: float = 0.5
    lr_base_batch: int = 16
    min_lr: float = 0.0
    num_layers: int | None = None  # the layer decay's num_layers; None: the official configs' (see train.optim)

    def __post_init__(self) -> None:
        from ..factory import check_model_name

        check_model_name(self.model)
        super().__post_init__()
        for name in ("hflip", "photometric"):
            if not 0 <= getattr(self, name) <= 1:
                _fail(f"{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.fsdp:
            _fail("--fsdp is for classification; detectors and segmenters train with DDP (--nproc)")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """A YAML/CLI value converted to the field's type, with an error naming the key."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        nothing = ("none", "null", "", "auto") if name == "threads" else ("none", "null", "")
        if value is None or (isinstance(value, str) and value.lower() in nothing):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if typing.get_origin(hint) is tuple:
            seq = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            inner = typing.get_args(hint)
            if len(inner) == 2 and inner[1] is Ellipsis:  # any length
                return tuple(inner[0](v) for v in seq)
            if len(seq) != len(inner):
                raise ValueError
            return tuple(t(v) for t, v in zip(inner, seq, strict=True))
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


def list_recipes() -> list[str]:
    """The recipes shipped with the package (`convnext train --config NAME`)."""
    return sorted(p.name[:-5] for p in resources.files("convnext").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def find_recipe(name: str | os.PathLike) -> Path | resources.abc.Traversable:
    """A recipe file: a path, or the name of a packaged recipe (`in1k_convnext_tiny`, with or without .yaml)."""
    if Path(name).is_file():
        return Path(name)
    stem = Path(name).name.removesuffix(".yaml")
    packaged = resources.files("convnext").joinpath("configs", f"{stem}.yaml")
    if str(name) in (stem, f"{stem}.yaml", f"configs/{stem}.yaml") and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config file not found: {name} (packaged recipes: {', '.join(list_recipes())})")


def load_yaml(path: str | os.PathLike, cls: type = ClassifyConfig) -> dict[str, Any]:
    """A recipe (a file or a packaged recipe's name) as {field: value} for `cls`, each value converted to the field's type."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object (never constructed)
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"{path}: not a readable recipe{at}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise ValueError(f"{path}: unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        out[name] = _coerce(cls, name, value)
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type = ClassifyConfig) -> None:
    """One flag per config field, default None so that only given flags override YAML."""
    parser.add_argument("--config", help="YAML recipe: a file, or a packaged recipe's name (e.g. in1k_convnext_tiny); "
                                         "flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = (_flag(f.name), *FLAG_ALIASES.get(f.name, ()))
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {f.default})")
        elif typing.get_origin(hint) is tuple:
            inner = typing.get_args(hint)
            nargs = "+" if len(inner) == 2 and inner[1] is Ellipsis else len(inner)
            parser.add_argument(*flags, dest=f.name, nargs=nargs, default=None, metavar="V",
                                help=f"(default: {' '.join(map(str, f.default)) or 'none'})")
        else:
            parser.add_argument(*flags, dest=f.name, default=None, help=f"(default: {f.default})")


def set_epochs(values: dict[str, Any], epochs: int, cls: type) -> dict[str, Any]:
    """`values` (a recipe) for a run of `epochs`: the recipe's warm-up as it is when it fits, else its share
    of the recipe's schedule (said in the log). The one place where `--epochs` moves the warm-up."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    recipe_epochs = values.get("epochs", defaults["epochs"])
    recipe_warmup = values.get("warmup_epochs", defaults["warmup_epochs"])
    out = values | {"epochs": epochs}
    if recipe_warmup >= epochs >= 1:
        out["warmup_epochs"] = recipe_warmup * epochs / recipe_epochs
        logger.info("--epochs %d: the recipe's %g warm-up epochs do not fit; keeping its warm-up share "
                    "(%g of %d epochs) -> --warmup-epochs %.3g", epochs, recipe_warmup, recipe_warmup,
                    recipe_epochs, out["warmup_epochs"])
    return out


def from_args(args: argparse.Namespace, cls: type = ClassifyConfig) -> EngineConfig:
    """The config of `cls`: its defaults, then `--config` YAML, then the flags given (`--epochs` alone moves
    the warm-up as `set_epochs` says; a warm-up given on the command line is taken as it is)."""
    values: dict[str, Any] = load_yaml(args.config, cls) if getattr(args, "config", None) else {}
    flags = {f.name: _coerce(cls, f.name, getattr(args, f.name)) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    if "epochs" in flags and "warmup_epochs" not in flags:
        values = set_epochs(values, flags["epochs"], cls)
    return make_config(cls, values | flags)


def recipe(name: str | os.PathLike, cls: type = ClassifyConfig, *, epochs: int | None = None,
           **overrides: Any) -> EngineConfig:
    """A packaged recipe (or a YAML file) as a config of `cls`, for `epochs` (`set_epochs`) and with `overrides`."""
    values = load_yaml(name, cls)
    if epochs:
        values = set_epochs(values, epochs, cls)
    return make_config(cls, values | overrides)


def make_config(cls: type, values: dict[str, Any]) -> EngineConfig:
    """`cls(**values)`, with the V2 fine-tuning defaults where a classification run fine-tunes a V2 model."""
    return cls(**(finetune_defaults(values) if issubclass(cls, ClassifyConfig) else values))


# ConvNeXt V2 fine-tuning from FCMAE (official TRAINING.md, atto..tiny): the classifier starts near zero and
# earlier layers learn more slowly; GRN parameters are never weight-decayed (train.optim.param_groups).
V2_FINETUNE = {"head_init_scale": 0.001, "layer_decay": 0.9, "layer_decay_type": "single"}


def finetune_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Classification settings plus, when they fine-tune a V2 model (`finetune`), the V2 fine-tuning
    defaults for the keys they leave unset (said in the log)."""
    if not (values.get("finetune") and str(values.get("model", "")).startswith("convnextv2")):
        return values
    implied = {k: v for k, v in V2_FINETUNE.items() if k not in values}
    if implied:
        logger.info("--finetune: the ConvNeXt V2 fine-tuning defaults %s (set them to override)",
                    ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in implied.items()))
    return values | implied


def save_yaml(cfg: EngineConfig, path: str | os.PathLike) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


__all__ = ["ClassifyConfig", "DenseConfig", "EngineConfig", "TrainConfig", "add_arguments", "from_args", "load_yaml",
           "recipe", "save_yaml", "set_epochs"]
