"""The one header of every file this library writes, and the one reader of every model file.

Every file we write — `best.safetensors`, a training state (`last.pt`, `checkpoints/step-*.pt`), a converted
or exported-to-layout file, an FCMAE model — carries one header:

    format: "convnext"    version: 3    task: "classify" | "detect" | "segment" | "pretrain" | ...
    spec: what rebuilds the model (`model_name`, and per task: classes, preprocessing, the detector's
          or the FCMAE decoder's settings)
    layout: the key layout of the weights when it is not ours ("official", "timm", "fcmae_official", ...)

In safetensors files the header is the metadata (`spec` as JSON, beside free keys such as `epoch` and the
best metric); in `.pt` files it is the same keys at the top level, beside `model` (the state dict) and, in
training states, `model_ema`, `optimizer`, `progress` and the rest. `read_model_file` reads any model file
— ours of any version written so far, and every foreign layout the converters know — and returns one
`ModelFile`: (task, spec, state dicts). The word `model` in a file means a state dict; a name is `model_name`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .convert import detect_format, unwrap
from .io import CheckpointError, read_checkpoint, write_safetensors

FORMAT = "convnext"
VERSION = 3
_HEADER_KEYS = ("format", "version", "task", "spec", "layout")
# `format` values written before version 3 (still read): safetensors metadata of the classifier, dense
# and FCMAE files, and `convnext convert --to fcmae`'s safetensors output
_LEGACY_DENSE, _LEGACY_FCMAE, _LEGACY_FCMAE_OFFICIAL = "convnext-dense", "convnext-fcmae", "fcmae"
_LAYOUTS = ("official", "official_isotropic", "timm", "torchvision", "hf")  # save_checkpoint(fmt=...) before v3


def header(task: str, spec: Mapping[str, Any], layout: str = "ours") -> dict[str, Any]:
    """The header of a file of `task` whose model `spec` describes (the keys of a `.pt` file's top level)."""
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "task": task, "spec": dict(spec)}
    if layout != "ours":
        out["layout"] = layout
    return out


def write_model_file(path: str | os.PathLike, task: str, spec: Mapping[str, Any],
                     state_dict: Mapping[str, torch.Tensor], *, layout: str = "ours",
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Weights as safetensors (atomically) with the header; `metadata`: free keys (epoch, metrics)."""
    clash = sorted(set(metadata or {}) & set(_HEADER_KEYS))
    if clash:
        raise ValueError(f"metadata keys {clash} are the header's")
    write_safetensors(path, state_dict, {**header(task, spec, layout), **(metadata or {})})


@dataclass
class ModelFile:
    """A model file, read: its task, the spec that rebuilds the model, and its state dicts."""

    path: str
    task: str
    spec: dict[str, Any]
    layout: str = "ours"  # key layout of the state dicts ("ours", or a foreign layout to convert from)
    metadata: dict[str, Any] = field(default_factory=dict)  # the free keys (epoch, best metric, ...)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the file's top level, as read
    version: int = VERSION  # 0: a foreign file (no header of ours)

    @property
    def model_name(self) -> str | None:
        return self.spec.get("model_name")

    @property
    def is_training_state(self) -> bool:
        """A training state (`last.pt`, step files): weights, optimizer, progress, history."""
        return "step" in self.raw and isinstance(self.raw.get("model"), Mapping)

    def state_dict(self, key: str | None = None) -> dict[str, torch.Tensor]:
        """The weights, in the file's `layout`: "model" (the default) or `key` ("model_ema" of a training state).
        Weights that are not finite (a diverged run) are an error naming the first bad tensor."""
        try:
            sd = unwrap(self.raw, key)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise CheckpointError(f"{self.path}: tensor {bad} holds NaN or inf values: these weights are broken "
                                  f"(a diverged run?) and would predict nothing")
        return sd

    def training_state(self) -> dict[str, Any]:
        if not self.is_training_state:
            raise CheckpointError(f"{self.path}: not a convnext training checkpoint (no model/step)")
        return self.raw


def _json(value: Any, what: str, path: object) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the {what} in its header is not valid JSON") from None


def _renamed(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec written before version 3 (`model` = the backbone's name) in today's keys."""
    spec = dict(spec)
    if "model" in spec:
        spec["model_name"] = spec.pop("model")
    return spec


def _legacy_training_spec(obj: Mapping[str, Any], path: object) -> tuple[str, dict[str, Any]]:
    """(task, spec) of a version-1/2 training state: identity keys at the top level."""
    if isinstance(obj.get("dense_spec"), Mapping):
        spec = _renamed(obj["dense_spec"])
        return spec.pop("task"), spec
    if isinstance(obj.get("fcmae"), Mapping):
        return "pretrain", _renamed(obj["fcmae"])
    from ..preprocess import Preprocess

    cfg = obj.get("config") or {}
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{path}: a training state whose config is damaged (a {type(cfg).__name__}): not a "
                              f"model file")
    pre = Preprocess.from_dict({k: cfg[k] for k in ("input_size", "crop_pct") if k in cfg})
    return "classify", {"model_name": obj.get("model_name"), "classes": list(obj.get("classes") or []),
                        "preprocess": pre.to_dict()}


def _legacy_safetensors_spec(meta: Mapping[str, Any], path: object) -> tuple[str, dict[str, Any], str]:
    """(task, spec, layout) of a safetensors file written before version 3."""
    fmt = meta.get("format")
    if fmt == _LEGACY_DENSE:
        spec = _renamed(_json(meta.get("spec", "{}"), "spec", path))
        return spec.pop("task", "detect"), spec, "ours"
    if fmt == _LEGACY_FCMAE:
        return "pretrain", _renamed(_json(meta.get("fcmae", "{}"), "fcmae spec", path)), "ours"
    if fmt == _LEGACY_FCMAE_OFFICIAL:
        return "pretrain", {"model_name": meta.get("model")}, "fcmae_official"
    spec: dict[str, Any] = {"model_name": meta.get("model")}
    if "config" in meta:
        spec["model_config"] = _json(meta["config"], "config", path)
    if "classes" in meta:
        spec["classes"] = _json(meta["classes"], "classes", path)
    if "preprocess" in meta:
        spec["preprocess"] = _json(meta["preprocess"], "preprocess", path)
    return "classify", spec, "ours" if fmt == FORMAT else fmt


def _foreign(obj: Mapping[str, Any], path: object) -> tuple[str, dict[str, Any], str]:
    """(task, spec, layout) of a file with no header of ours: a classifier (or encoder) in any layout the
    converters know, or a whole official FCMAE pre-training model."""
    wrapped = [obj[k] for k in ("model", "state_dict", "model_ema", "module") if isinstance(obj.get(k), Mapping)]
    sd = next((w for w in wrapped if any(isinstance(v, torch.Tensor) for v in w.values())), obj)
    if "mask_token" in sd and "encoder.stem.conv.weight" not in sd:
        return "pretrain", {"model_name": _guess_name(sd, "fcmae_official")}, "fcmae_official"
    from .dense_official import is_official_detector, is_official_segmenter, official_detector_spec, official_segmenter_spec

    if is_official_detector(sd):  # an official Mask R-CNN or Cascade Mask R-CNN (mmdet) file
        meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else None
        return "detect", official_detector_spec(sd, meta), "mmdet"
    if is_official_segmenter(sd):  # an official UperNet (mmseg) file: its spec from its keys and meta
        meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else None
        return "segment", official_segmenter_spec(sd, meta, Path(str(path)).name), "mmseg"
    try:
        layout = detect_format(unwrap(sd))
    except CheckpointError:  # said by whoever reads the weights (`to_ours`), with the key they ask for
        return "classify", {"model_name": None}, "unknown"
    return "classify", {"model_name": _guess_name(unwrap(sd), layout)}, layout


def _guess_name(sd: Mapping[str, torch.Tensor], layout: str) -> str | None:
    """The registered architecture of a state dict, or None where its layout cannot say (the caller names it)."""
    from .convert import fcmae_from_official, infer_model_name, to_ours

    try:
        if layout == "fcmae_official":
            full = fcmae_from_official(sd)
            ours = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
        else:
            ours = to_ours(sd, layout)[1]
        return infer_model_name(ours)
    except (CheckpointError, KeyError, ValueError):
        return None


def _check_spec(spec: Mapping[str, Any], path: object) -> None:
    """The spec's common fields of the right types (a damaged or hand-edited header is one clear error)."""
    checks = {"model_name": lambda v: v is None or isinstance(v, str),
              "classes": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
              "preprocess": lambda v: isinstance(v, Mapping), "model_config": lambda v: isinstance(v, Mapping)}
    for key, ok in checks.items():
        if key in spec and not ok(spec[key]):
            raise CheckpointError(f"{path}: its header's {key} is damaged (got {type(spec[key]).__name__} "
                                  f"{str(spec[key])[:60]!r})")


def parse(obj: Mapping[str, Any], metadata: Mapping[str, Any], path: object = "checkpoint") -> ModelFile:
    """A file's contents (as `read_checkpoint` returns them) -> `ModelFile`."""
    meta = dict(metadata)
    version = 0
    if meta.get("format") == FORMAT and "task" in meta:  # safetensors, version >= 3
        task, spec, layout = meta["task"], _json(meta.get("spec", "{}"), "spec", path), meta.get("layout", "ours")
        version = int(meta.get("version", VERSION))
    elif obj.get("format") == FORMAT and "task" in obj:  # .pt, version >= 3
        task, spec, layout, version = obj["task"], obj.get("spec") or {}, obj.get("layout", "ours"), obj["version"]
    elif meta.get("format") in (FORMAT, _LEGACY_DENSE, _LEGACY_FCMAE, _LEGACY_FCMAE_OFFICIAL, *_LAYOUTS):
        (task, spec, layout), version = _legacy_safetensors_spec(meta, path), 2
    elif "model_name" in obj and "step" in obj:  # a training state, versions 1 and 2
        (task, spec), layout, version = _legacy_training_spec(obj, path), "ours", int(obj.get("version", 1))
    else:
        task, spec, layout = _foreign(obj, path)
    if not isinstance(task, str) or not isinstance(spec, Mapping):
        raise CheckpointError(f"{path}: its header is damaged (task {task!r}, spec of type {type(spec).__name__})")
    _check_spec(spec, path)
    free = {k: v for k, v in meta.items() if k not in (*_HEADER_KEYS, "model", "arch", "config", "classes",
                                                        "preprocess", "fcmae")}
    return ModelFile(str(path), task, dict(spec), layout, free, dict(obj), version)


def read_model_file(src: str | os.PathLike | Mapping[str, Any] | ModelFile) -> ModelFile:
    """Any model file (ours of every version, or a foreign layout), a Hub model folder or name (`hf-hub:org/name`,
    `local-dir:DIR`; `weights.hub`), or an already loaded dict, as a `ModelFile`."""
    if isinstance(src, ModelFile):
        return src
    if isinstance(src, Mapping):
        return parse(src, {}, "the state dict")
    from . import hub

    if hub.is_hub_name(str(src)):  # hf-hub:org/name, local-dir:DIR
        src = hub.resolve(str(src))
    obj, metadata = read_checkpoint(src)
    file = parse(obj, metadata, Path(src))
    if Path(src).is_dir():  # a Hub folder (timm's or transformers'): its config names the model, classes, preprocessing
        file.spec.update(hub.folder_spec(Path(src)))
    return file


__all__ = ["FORMAT", "VERSION", "ModelFile", "header", "parse", "read_model_file", "write_model_file"]
