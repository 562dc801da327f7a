"""`create_model`, `list_models`, `list_pretrained`, `load_for_inference`: the front door of the library."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import MODELS
from .preprocess import Preprocess
from .weights import (PRETRAINED, CheckpointError, PretrainedWeights, download, hub, infer_config,
                      load_state_dict_into, ModelFile, read_model_file, to_ours)
from .weights.convert import _match_arch, infer_model_name

logger = logging.getLogger(__name__)


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style pattern, e.g. "convnextv2_*"."""
    return sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    """Weight tags `arch.tag` matching a pattern; "convnext_tiny" alone lists all of its tags."""
    if "." not in pattern and not pattern.endswith("*"):
        pattern += ".*"
    return sorted(n for n in PRETRAINED if fnmatch.fnmatch(n, pattern))


def check_model_name(name: str) -> str:
    """`name` itself if registered, else ValueError with close matches."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (`convnext list` shows all)")
    return name


def _check_family(arch: str, want: dict[str, Any], inferred: dict[str, Any], saved_name: str | None,
                  where: object) -> None:
    """A checkpoint of another family (V1 vs V2, LayerScale or not) than the requested model is an error."""
    if saved_name and saved_name != arch:
        raise ValueError(f"{where} holds a {saved_name} (saved by this library), not {arch}; "
                         f"use create_model({saved_name!r}, pretrained=...)")
    if inferred["use_grn"] != want["use_grn"]:
        found = _match_arch(MODELS[arch][0].__name__, inferred) or "model with" + (" GRN" if inferred["use_grn"] else "out GRN")
        family = "ConvNeXt V2 (GRN)" if inferred["use_grn"] else "ConvNeXt V1 (no GRN)"
        raise ValueError(f"{where} holds a {family} {found}, not {arch}; use create_model({found!r}, pretrained=...)")
    has_ls = inferred["ls_init_value"] is not None
    if has_ls != bool(want["ls_init_value"]):
        fix = "ls_init_value=1e-6 to build it with LayerScale" if has_ls else "ls_init_value=None to build it without"
        raise ValueError(f"{where} {'has' if has_ls else 'has no'} LayerScale (gamma) but {arch} "
                         f"{'has none' if has_ls else 'has it'}; if this is the model you mean, pass {fix}")


def _resolve_pretrained(arch: str, tag: str, pretrained: Any
                        ) -> tuple[PretrainedWeights | None, Path | Mapping[str, Any] | None]:
    if pretrained is False or pretrained is None:
        return None, None
    if isinstance(pretrained, Mapping):  # an already loaded checkpoint or state dict
        return None, pretrained
    if pretrained is True:
        if tag:
            pretrained = f"{arch}.{tag}"
        else:  # default: the first ImageNet-1K classifier at 224 in table order, as timm
            tags = [t for t, w in PRETRAINED.items() if t.split(".", 1)[0] == arch]
            if not tags:
                raise ValueError(f"no pretrained weights are published for {arch}; pass a checkpoint path instead")
            pretrained = next((t for t in tags if PRETRAINED[t].num_classes == 1000
                               and PRETRAINED[t].preprocess.input_size == 224), tags[0])
    if isinstance(pretrained, str) and pretrained in PRETRAINED:
        if pretrained.split(".", 1)[0] != arch:
            raise ValueError(f"weights {pretrained!r} are for {pretrained.split('.', 1)[0]}, not {arch}")
        info = PRETRAINED[pretrained]
        return info, download(info.url, sha256=info.sha256)
    if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).exists():
        return None, Path(pretrained)
    if hub.is_hub_name(pretrained):  # hf-hub:org/name (the local cache, or a download), local-dir:DIR
        return None, hub.resolve(pretrained)
    close = difflib.get_close_matches(str(pretrained), list_pretrained(arch) or list(PRETRAINED), n=3, cutoff=0.4)
    raise ValueError(f"pretrained={str(pretrained)!r} is neither a weights tag nor an existing file"
                     + (f"; did you mean {', '.join(close)}?" if close else "")
                     + f" (`convnext info {arch}` lists its weights)")


def _create_from_hub(name: str, pretrained: Any, **kwargs: Any) -> nn.Module:
    if pretrained not in (False, True):
        raise ValueError(f"create_model({name!r}) brings its own weights; pass pretrained=True (or False)")
    folder = hub.resolve(name)
    arch = hub.folder_spec(folder).get("model_name") or read_model_file(folder).model_name  # (transformers': keys)
    if arch is None:
        raise CheckpointError(f"{name}: its folder does not say which ConvNeXt it holds")
    return create_model(arch, pretrained=folder if pretrained else False, **kwargs)


def create_model(name: str, *, pretrained: bool | str | os.PathLike = False, num_classes: int | None = None,
                 in_chans: int = 3, drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), **overrides: Any) -> nn.Module:
    """Build a registered ConvNeXt, optionally with weights.

    Args:
        name: architecture (`convnext_tiny`), or `arch.tag` to pick weights with `pretrained=True`.
        pretrained: False; True (the first published weights, or the tag in `name`); a weights tag
            such as "convnext_tiny.fb_in22k_ft_in1k"; a path to a checkpoint in any supported
            format (official, FCMAE, timm, torchvision, Hugging Face, ours); or a loaded state dict.
        num_classes: classifier size; None means the checkpoint's (1000 without weights). A
            different number re-initialises the classifier and says so; 0 removes it.
        in_chans: input channels; a different number than the checkpoint's adapts the stem.
        drop_path_rate: stochastic depth at the last block (training only).
        features_only: return the list of stage outputs at `out_indices` instead of logits.
        **overrides: any other config field (e.g. `ls_init_value`, `head_init_scale`).
    """
    if hub.is_hub_name(name):  # timm's `create_model("hf-hub:org/name")`: the folder names its architecture
        return _create_from_hub(name, pretrained, num_classes=num_classes, in_chans=in_chans, features_only=features_only,
                                drop_path_rate=drop_path_rate, out_indices=out_indices, **overrides)
    arch, _, tag = name.partition(".")
    check_model_name(arch)
    cls, base = MODELS[arch]
    if features_only and not hasattr(base, "depths"):
        raise ValueError(f"features_only needs a hierarchical ConvNeXt; {arch} is isotropic (one scale)")
    valid = {f.name for f in dataclasses.fields(base)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown option(s) {', '.join(bad)} for {arch}; valid: {', '.join(sorted(valid))}")
    info, path = _resolve_pretrained(arch, tag, pretrained)
    fields: dict[str, Any] = dataclasses.asdict(base)
    sd, fmt = None, None
    if path is not None:
        file = read_model_file(path)
        fmt, sd = to_ours(file.state_dict(info.key if info else None))
        saved_name, saved = (file.model_name, file.spec.get("model_config")) if file.version else (None, None)
        cls_name, inferred = infer_config(sd)
        found = _match_arch(cls_name, inferred)
        where = path if isinstance(path, Path) else "the checkpoint"
        if cls_name != cls.__name__ or any(inferred[k] != fields[k] for k in ("depths", "dims", "depth", "dim")
                                           if k in inferred):
            shape = {k: inferred[k] for k in ("depths", "dims", "depth", "dim") if k in inferred}
            raise ValueError(f"{where} holds a {found or 'different architecture'} {shape}, not {arch}; "
                             f"use create_model({(found or '<name>')!r}, pretrained=...)")
        if saved:  # our own file: it knows its full config
            fields.update({k: v for k, v in saved.items() if k in valid})
        _check_family(arch, fields | overrides, inferred, saved_name, where)
        fields["patch_size"] = inferred["patch_size"]  # the stem follows the checkpoint
        if num_classes is None:
            num_classes = inferred.get("num_classes", 0)
    fields.update(num_classes=1000 if num_classes is None else num_classes, in_chans=in_chans,
                  drop_path_rate=drop_path_rate, **overrides)
    cfg = type(base)(**fields)
    model = cls(cfg, features_only=features_only, out_indices=out_indices) if hasattr(cfg, "depths") else cls(cfg)
    model.model_name = arch
    model.pretrained_cfg = info
    if sd is not None:
        load_state_dict_into(model, sd, adapt=True, allow_missing_head=fmt == "fcmae")
        logger.debug("loaded %s weights from %s", fmt, path if isinstance(path, Path) else "state dict")
    return model


@dataclasses.dataclass
class InferenceInfo:
    """What a trained classifier needs besides its weights: its name, class names and preprocessing."""

    model_name: str
    classes: list[str]
    preprocess: Preprocess = dataclasses.field(default_factory=Preprocess)
    multi_label: bool = False  # trained with --multi-label: a sigmoid per class, not a softmax over them

    def transform(self):
        from .data import eval_transform

        return eval_transform(self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON (what exported files embed): model_name, classes, the preprocessing fields, and
        `multi_label: true` for a multi-label classifier (absent otherwise, as in files exported before it)."""
        return ({"model_name": self.model_name, "classes": list(self.classes), **self.preprocess.to_dict()}
                | ({"multi_label": True} if self.multi_label else {}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InferenceInfo:
        return cls(d["model_name"], list(d["classes"]), Preprocess.from_dict(d), multi_label=d.get("multi_label") is True)


def load_for_inference(src: str | os.PathLike | ModelFile, *, key: str | None = None
                       ) -> tuple[nn.Module, InferenceInfo]:
    """A classifier in eval mode and what it needs: class names and eval preprocessing.

    Reads any model file through the one reader (`weights.read_model_file`): ours (the header's spec
    holds the name, classes and preprocessing), or any other supported layout (class names are then the
    indices, preprocessing the defaults). A file of another task is an error naming its command.
    """
    file = read_model_file(src)
    if file.task != "classify":
        raise CheckpointError(f"{file.path} holds a {file.task} model, not a classifier: "
                              f"use `convnext {file.task} eval|predict`")
    _, ours = to_ours(file.state_dict(key))
    name = file.model_name or infer_model_name(ours, file.path)
    model = create_model(name, pretrained=ours).eval()
    from .data.imagenet import default_classes, synsets_of_names

    classes = list(file.spec.get("classes") or default_classes(model.num_classes))  # ImageNet's for 1000/21841
    classes = synsets_of_names(classes) or classes  # transformers' "tench, Tinca tinca": ImageNet's synsets
    if len(classes) != model.num_classes:
        raise CheckpointError(f"{file.path}: {len(classes)} class names for a {model.num_classes}-class model")
    try:
        pre = Preprocess.from_dict(file.spec.get("preprocess") or {})
    except ValueError as e:
        raise CheckpointError(f"{file.path}: the preprocessing in its header is damaged: {e}") from None
    multi = file.spec.get("multi_label") is True or file.metadata.get("multi_label") == "true"  # last.pt / best
    return model, InferenceInfo(name, classes, pre, multi_label=multi)


def pretrained_for_inference(name: str, pretrained: str | bool | os.PathLike = True) -> tuple[nn.Module, InferenceInfo]:
    """`load_for_inference` for published weights: `name` an architecture (`convnext_tiny`) or `arch.tag`,
    `pretrained` a tag of it (`fb_in1k` or `convnext_tiny.fb_in1k`), True (its default weights, as
    `create_model`) or a checkpoint file (which must hold that architecture). A published tag brings its
    own preprocessing (resolution, crop_pct, interpolation, crop mode) and the ImageNet classes."""
    arch, _, tag = str(name).partition(".")
    check_model_name(arch)
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool) and (
            Path(pretrained).exists() or hub.is_hub_name(pretrained)):  # a file, or hf-hub:ORG/NAME, local-dir:DIR
        model, info = load_for_inference(pretrained)
        if info.model_name != arch:
            raise ValueError(f"{pretrained} holds a {info.model_name}, not {arch}; use --model {info.model_name}")
        return model, info
    if isinstance(pretrained, str) and "." not in pretrained:
        pretrained = f"{arch}.{pretrained}"
    if isinstance(pretrained, str) and pretrained in PRETRAINED and not PRETRAINED[pretrained].num_classes:
        raise ValueError(f"{pretrained} is not a published classifier (an FCMAE encoder has no classifier to "
                         f"evaluate); `convnext info {arch}` lists its fine-tuned weights")
    model = create_model(f"{arch}.{tag}" if tag else arch, pretrained=pretrained).eval()
    weights = model.pretrained_cfg
    if weights is None or model.num_classes == 0:
        raise ValueError(f"{arch} with pretrained={pretrained!r}: not a published classifier")
    from .data.imagenet import default_classes

    return model, InferenceInfo(arch, default_classes(model.num_classes), weights.preprocess)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    name: str
    architecture: str  # class name
    config: dict[str, Any]
    params: int  # with the default 1000-class head
    macs: int  # multiply-accumulates at `input_size` (the papers' "FLOPs")
    input_size: int
    weights: list[str]  # published weight tags


def describe_model(name: str, input_size: int = 224) -> ModelSummary:
    """Parameters, multiply-accumulates and published weights of a registered model (counted on `meta`)."""
    from .models.flops import count_macs, count_params

    name = check_model_name(name.split(".", 1)[0])
    with torch.device("meta"):  # shapes only: counts without allocating weights
        model = create_model(name)
        params, macs = count_params(model), count_macs(model, input_size)
    return ModelSummary(name, type(model).__name__, dataclasses.asdict(model.cfg), params, macs, input_size,
                        list_pretrained(name))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "ours", key: str | None = None,
                       model: str | None = None, force: bool = False) -> tuple[str, str]:
    """`convnext convert`: any supported checkpoint -> layout `to`, in the container its owners load; returns
    (source format, model). `.safetensors` (our header in its metadata) for any layout, or as the owners save
    them: official / official_isotropic a `.pth` of `{"model": state_dict}` (the official `torch.load(path)["model"]`),
    timm a `.pth` of `{"state_dict": ...}` (timm's `load_checkpoint`), torchvision a `.pth` state dict alone
    (`model.load_state_dict(torch.load(path))`), hf a folder (`from_pretrained(DIR)`, as `--format transformers`).

    Never writes over `src`; an existing `dst` only with `force`.
    """
    from .utils import check_output

    if to != "hf":  # (hf: a folder, which `weights.hub.write_folder` checks)
        check_output(dst, inputs=(src,), force=force, suffixes=(".pt", ".pth", ".safetensors"))
    file = read_model_file(src)
    state_dict = file.state_dict(key)
    if to == "fcmae":
        return _convert_to_fcmae(src, dst, state_dict)
    if to in ("official-seg", "official-det") or file.task in _DENSE_OFFICIAL:
        return _convert_dense(file, dst, state_dict, to)
    fmt, ours = to_ours(state_dict)
    name = check_model_name(model) if model else file.model_name or infer_model_name(ours, src)
    classifier = create_model(name, pretrained=state_dict)
    if to == "hf":  # a transformers folder, with the classes and preprocessing the source knows
        pre = Preprocess.from_dict(file.spec["preprocess"]) if file.spec.get("preprocess") else None
        save_pretrained(classifier, dst, format="transformers", classes=file.spec.get("classes"), preprocess=pre,
                        force=force)
    else:
        _write_layout(classifier, dst, to, file.spec)
    return fmt, name


def _write_layout(model: nn.Module, dst: str | os.PathLike, to: str, spec: Mapping[str, Any]) -> None:
    """A classifier's weights in layout `to` at `dst`: safetensors with our header, or the owners' `.pth`."""
    from .utils import atomic_write
    from .weights import save_checkpoint
    from .weights.convert import from_ours
    from .weights.header import header

    keep = {k: spec[k] for k in ("classes", "preprocess") if spec.get(k)}
    if str(dst).endswith(".safetensors"):
        save_checkpoint(model, dst, fmt=to, classes=keep.get("classes"), preprocess=keep.get("preprocess"))
        return
    theirs = from_ours(model.state_dict(), to)
    own = header("classify", {"model_name": model.model_name, "model_config": dataclasses.asdict(model.cfg), **keep},
                 to)
    payload = {"torchvision": theirs, "timm": {"state_dict": theirs, **own}}.get(to, {"model": theirs, **own})
    atomic_write(dst, lambda tmp: torch.save(payload, tmp))


def _convert_to_fcmae(src: str | os.PathLike, dst: str | os.PathLike, sd: Mapping[str, Any]) -> tuple[str, str]:
    """A full FCMAE pre-training model (ours or official) -> the official FCMAE layout, `{"model": ...}` in a
    .pt file as the official `main_pretrain.py` saves it (or safetensors); both with our header beside."""
    from .utils import atomic_write
    from .weights import write_model_file
    from .weights.convert import fcmae_from_official, fcmae_to_official
    from .weights.header import header

    if "mask_token" not in sd:
        raise CheckpointError(f"{src} holds no FCMAE pre-training model (no mask_token): --to fcmae converts the "
                              f"last.pt / best.safetensors of `convnext pretrain`, or an official FCMAE file")
    ours = dict(sd) if "encoder.stem.conv.weight" in sd else fcmae_from_official(sd)
    official = fcmae_to_official(ours)
    name = infer_model_name({k[len("encoder."):]: v for k, v in ours.items() if k.startswith("encoder.")}, src)
    if str(dst).endswith(".safetensors"):
        write_model_file(dst, "pretrain", {"model_name": name}, official, layout="fcmae_official")
    else:
        atomic_write(dst, lambda tmp: torch.save({"model": official, **header("pretrain", {"model_name": name},
                                                                              "fcmae_official")}, tmp))
    return "fcmae", name


# task -> (the model it must be, its --to name, the official layout, where to read it: our file spec key and value)
_DENSE_OFFICIAL = {"segment": ("UperNet segmenter", "official-seg", "mmseg", ("head", ("upernet",))),
                   "detect": ("(Cascade) Mask R-CNN", "official-det", "mmdet", ("arch", ("maskrcnn", "cascade_maskrcnn")))}


def _convert_dense(file: ModelFile, dst: str | os.PathLike, sd: Mapping[str, Any], to: str) -> tuple[str, str]:
    """An UperNet or (Cascade) Mask R-CNN (ours, or an official mmseg / mmdet file) -> the official layout (`{"state_dict",
    "meta": {"CLASSES"}}` in a .pth as mmcv saves it, or safetensors; our header beside) or ours (`--to ours`).
    Our Mask R-CNN's background rows of the class-specific box and mask layers, which nothing reads, are not in
    the official layout."""
    from .utils import atomic_write
    from .weights import dense_official as official
    from .weights import write_model_file
    from .weights.header import header

    task = file.task if file.task in _DENSE_OFFICIAL else {"official-seg": "segment", "official-det": "detect"}[to]
    what, target, layout, (field, value) = _DENSE_OFFICIAL[task]
    if file.task != task or file.spec.get(field) not in value:
        raise CheckpointError(f"{file.path} holds no {what}: --to {target} converts `convnext {task}` {what} files, "
                              f"or the official ones")
    if to not in ("ours", target):
        raise CheckpointError(f"{file.path} is a {what}: convert it --to {target} or --to ours")
    seg = task == "segment"
    to_ours, to_official = ((official.segmenter_from_official, official.segmenter_to_official) if seg
                            else (official.detector_from_official, official.detector_to_official))
    ours, spec = to_ours(sd) if file.layout == layout else dict(sd), dict(file.spec)
    if to == "ours":
        write_model_file(dst, task, spec, ours)
    elif str(dst).endswith(".safetensors"):
        write_model_file(dst, task, spec, to_official(ours), layout=layout)
    else:
        weights = to_official(ours)
        atomic_write(dst, lambda tmp: torch.save({"state_dict": weights, "meta": {"CLASSES": tuple(spec["classes"])},
                                                  **header(task, spec, layout)}, tmp))
    return file.layout, spec["model_name"]


HUB_FORMATS = {"hub": "timm", "transformers": "transformers"}  # export format -> the library that loads it


def save_pretrained(model: nn.Module, folder: str | os.PathLike, *, format: str = "hub",
                    classes: list[str] | None = None, preprocess: Preprocess | None = None,
                    license: str | None = None, details: Mapping[str, Any] | None = None,
                    metrics: str | None = None, force: bool = False) -> Path:
    """A classifier as a Hub model folder: `format="hub"` timm's layout (`timm.create_model("local-dir:DIR",
    pretrained=True)`, or `hf-hub:` once pushed), `"transformers"` theirs (`AutoModelForImageClassification.
    from_pretrained(DIR)`, with its `AutoImageProcessor`); with a model card (README.md). `classes`: the class
    names (default: ImageNet's synsets for 1000 / 21,841 outputs, else "0" ..); `preprocess`: its evaluation
    preprocessing (default: its published weights', else the defaults); `license`: the weights' (default: its
    published weights', else "other"). Written atomically; an existing folder only with `force` (`weights.hub`)."""
    from .data.imagenet import default_classes

    if format not in HUB_FORMATS:
        raise ValueError(f"unknown Hub format {format!r}; choose one of {', '.join(HUB_FORMATS)}")
    name, cfg = getattr(model, "model_name", None), getattr(model, "cfg", None)
    if name is None or cfg is None or not getattr(model, "num_classes", 0):
        raise ValueError("save_pretrained takes a classifier built by convnext.create_model (with a head)")
    classes = list(classes) if classes is not None else default_classes(model.num_classes)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class model")
    weights = getattr(model, "pretrained_cfg", None)
    pre = preprocess or (weights.preprocess if weights is not None else Preprocess())
    library = HUB_FORMATS[format]
    card = hub.model_card(name, classes, pre, library=library,
                          license=license or (weights.license if weights is not None else "other"),
                          details=details, metrics=metrics)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write = hub.write_timm_folder if format == "hub" else hub.write_transformers_folder
    return hub.write_folder(folder, lambda tmp: write(tmp, sd, name, cfg, classes, pre, card), force=force)
