"""Checkpoint key layouts as declarative tables, and conversion between them and ours.

Each table row is `(their key template, our key template[, their tensor shape])`. Templates use
`{i}` (stage), `{j}` (block), `{p}` (weight|bias) and linear forms such as torchvision's `{2i+1}`.
The same rows convert in both directions; tensors are reshaped to the target's shape on load
(timm's 1x1-conv MLPs, GRN's (1,1,1,C), torchvision's (C,1,1) layer scale) and to `their shape`
on export.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models import MODELS
from .io import CheckpointError

Rule = tuple  # (theirs, ours) or (theirs, ours, their_shape)

_OURS_BLOCK = "stages.{i}.blocks.{j}."


def _block(theirs: str, names: dict[str, str], ours: str = _OURS_BLOCK, shapes: dict | None = None) -> list[Rule]:
    """Rules for one block: `names` maps their sub-name -> our sub-name (`{p}` added unless given)."""
    shapes = shapes or {}
    rows = []
    for t, o in names.items():
        suffix = "" if ("gamma" in o or "beta" in o) else ".{p}"
        rows.append((theirs + t + suffix, ours + o + suffix, shapes.get(t)))
    return rows


_BLOCK_NAMES = {"dwconv": "dwconv", "norm": "norm", "pwconv1": "pwconv1", "pwconv2": "pwconv2"}

OFFICIAL: list[Rule] = [
    ("downsample_layers.0.0.{p}", "stem.conv.{p}"),
    ("downsample_layers.0.1.{p}", "stem.norm.{p}"),
    ("downsample_layers.{i}.0.{p}", "stages.{i}.downsample.norm.{p}"),
    ("downsample_layers.{i}.1.{p}", "stages.{i}.downsample.conv.{p}"),
    *_block("stages.{i}.{j}.", {**_BLOCK_NAMES, "grn.gamma": "grn.gamma", "grn.beta": "grn.beta", "gamma": "gamma"},
            shapes={"grn.gamma": (1, 1, 1, -1), "grn.beta": (1, 1, 1, -1)}),
    ("norm.{p}", "head.norm.{p}"),
    ("head.{p}", "head.fc.{p}"),
]

OFFICIAL_ISOTROPIC: list[Rule] = [
    ("stem.{p}", "stem.{p}"),
    *_block("blocks.{j}.", {**_BLOCK_NAMES, "gamma": "gamma"}, ours="blocks.{j}."),
    ("norm.{p}", "head.norm.{p}"),
    ("head.{p}", "head.fc.{p}"),
]

TIMM: list[Rule] = [
    ("stem.0.{p}", "stem.conv.{p}"),
    ("stem.1.{p}", "stem.norm.{p}"),
    ("stages.{i}.downsample.0.{p}", "stages.{i}.downsample.norm.{p}"),
    ("stages.{i}.downsample.1.{p}", "stages.{i}.downsample.conv.{p}"),
    *_block("stages.{i}.blocks.{j}.", {"conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "pwconv1",
                                       "mlp.fc2": "pwconv2", "mlp.grn.weight": "grn.gamma",
                                       "mlp.grn.bias": "grn.beta", "gamma": "gamma"}),
    ("head.norm.{p}", "head.norm.{p}"),
    ("head.fc.{p}", "head.fc.{p}"),
]

TORCHVISION: list[Rule] = [
    ("features.0.0.{p}", "stem.conv.{p}"),
    ("features.0.1.{p}", "stem.norm.{p}"),
    ("features.{2i}.0.{p}", "stages.{i}.downsample.norm.{p}"),
    ("features.{2i}.1.{p}", "stages.{i}.downsample.conv.{p}"),
    *_block("features.{2i+1}.{j}.", {"block.0": "dwconv", "block.2": "norm", "block.3": "pwconv1",
                                     "block.5": "pwconv2", "layer_scale": "gamma"},
            shapes={"layer_scale": (-1, 1, 1)}),
    ("classifier.0.{p}", "head.norm.{p}"),
    ("classifier.2.{p}", "head.fc.{p}"),
]

# Hugging Face transformers ConvNext* / ConvNextV2*, after the `convnext.` / `convnextv2.` prefix.
HF: list[Rule] = [
    ("embeddings.patch_embeddings.{p}", "stem.conv.{p}"),
    ("embeddings.layernorm.{p}", "stem.norm.{p}"),
    ("encoder.stages.{i}.downsampling_layer.0.{p}", "stages.{i}.downsample.norm.{p}"),
    ("encoder.stages.{i}.downsampling_layer.1.{p}", "stages.{i}.downsample.conv.{p}"),
    *_block("encoder.stages.{i}.layers.{j}.", {"dwconv": "dwconv", "layernorm": "norm", "pwconv1": "pwconv1",
                                               "pwconv2": "pwconv2", "grn.weight": "grn.gamma",
                                               "grn.bias": "grn.beta", "layer_scale_parameter": "gamma"},
            shapes={"grn.weight": (1, 1, 1, -1), "grn.bias": (1, 1, 1, -1)}),
    ("layernorm.{p}", "head.norm.{p}"),
    ("classifier.{p}", "head.fc.{p}"),
]

TABLES: dict[str, list[Rule]] = {
    "official": OFFICIAL, "official_isotropic": OFFICIAL_ISOTROPIC, "timm": TIMM,
    "torchvision": TORCHVISION, "hf": HF,
}
FORMATS = ("ours", "official", "official_isotropic", "fcmae", "timm", "torchvision", "hf")

_PH = re.compile(r"\{(\d*)([a-z])(?:\+(\d+))?\}")


class _Template:
    """A key template compiled to a regex; solves linear placeholders such as `{2i+1}`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.specs: list[tuple[int, str, int]] = []
        parts, last = [], 0
        for m in _PH.finditer(text):
            parts.append(re.escape(text[last:m.start()]))
            a, var, b = int(m.group(1) or 1), m.group(2), int(m.group(3) or 0)
            parts.append(r"(weight|bias)" if var == "p" else r"(\d+)")
            self.specs.append((a, var, b))
            last = m.end()
        parts.append(re.escape(text[last:]))
        self.regex = re.compile("".join(parts) + r"\Z")

    def match(self, key: str) -> dict[str, Any] | None:
        m = self.regex.match(key)
        if m is None:
            return None
        values: dict[str, Any] = {}
        for (a, var, b), g in zip(self.specs, m.groups(), strict=True):
            if var == "p":
                values["p"] = g
                continue
            n = int(g) - b
            if n < 0 or n % a or values.get(var, n // a) != n // a:
                return None
            values[var] = n // a
        return values

    def format(self, values: dict[str, Any]) -> str:
        def sub(m: re.Match) -> str:
            a, var, b = int(m.group(1) or 1), m.group(2), int(m.group(3) or 0)
            return values[var] if var == "p" else str(a * values[var] + b)
        return _PH.sub(sub, self.text)


_COMPILED: dict[str, list[tuple[_Template, _Template, tuple | None]]] = {
    name: [(_Template(r[0]), _Template(r[1]), r[2] if len(r) > 2 else None) for r in rows]
    for name, rows in TABLES.items()
}


def _rename(sd: Mapping[str, torch.Tensor], fmt: str, to_ours: bool) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        for theirs, ours, shape in _COMPILED[fmt]:
            src, dst = (theirs, ours) if to_ours else (ours, theirs)
            values = src.match(key)
            if values is not None:
                if not to_ours and shape is not None:
                    value = value.reshape(shape)
                out[dst.format(values)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys do not belong to a {fmt} ConvNeXt checkpoint: "
                              f"{_preview(unknown)}")
    return out


def _preview(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def unwrap(obj: Mapping[str, Any], key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: `{'model': ...}`, `{'model_ema': ...}`, `{'state_dict': ...}`.

    `key` picks a wrapper explicitly (e.g. "model_ema" for the EMA weights of an official or our
    own training checkpoint); an unknown key is an error that lists the keys the file has. Without
    it, the first of model, state_dict, model_ema, module is used. DDP `module.` and torch.compile
    `_orig_mod.` prefixes are stripped, and so is the sample counter of torch's `AveragedModel` (EMA).
    """
    if key is not None:
        if not isinstance(obj.get(key), Mapping):
            found = [k for k, v in obj.items()
                     if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())]
            if found:
                why = "it is empty (this run had no EMA?)" if key in obj else "it has none"
                raise CheckpointError(f"no state dict under --key {key!r} ({why}); the file has: {', '.join(found)}")
            raise CheckpointError(f"--key {key!r} does not apply: the file holds a single state dict (no keys "
                                  f"to choose from); drop --key")
        obj = obj[key]
    else:
        for k in ("model", "state_dict", "model_ema", "module"):
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor) or k == "n_averaged":
            continue  # e.g. epoch counters saved beside the weights, AveragedModel's sample count
        if not isinstance(k, str):
            raise CheckpointError(f"the state dict has a key {k!r} of type {type(k).__name__}: not a model's weights")
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    if not sd:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {_preview(list(obj))})")
    return sd


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """Which layout a (unwrapped) state dict uses; one of `FORMATS`."""
    keys = set(sd)
    if "stem.conv.weight" in keys or ("stem.weight" in keys and "head.norm.weight" in keys):
        return "ours"
    if any(re.match(r"(convnext(v2)?\.)?embeddings\.patch_embeddings\.", k) for k in keys):
        return "hf"
    if "mask_token" in keys or any(k.startswith("encoder.") and k.endswith(".kernel") for k in keys):
        return "fcmae"
    if "downsample_layers.0.0.weight" in keys:
        return "official"
    if "stem.weight" in keys and "blocks.0.dwconv.weight" in keys:
        return "official_isotropic"
    if "stem.0.weight" in keys:
        return "timm"
    if "features.0.0.weight" in keys:
        return "torchvision"
    raise CheckpointError(f"unrecognised checkpoint layout (not official, FCMAE, timm, torchvision, Hugging Face "
                          f"or ours); first keys: {_preview(list(keys))}")


def _fcmae_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FCMAE pre-training checkpoint -> official dense layout (as the official `remap_checkpoint_keys`).

    The decoder, `proj`, `pred` and `mask_token` are dropped; MinkowskiEngine kernels (k*k, in, out)
    and depthwise kernels (k*k, C) become Conv2d weights; `.ln.` / `.linear.` wrappers are removed.
    """
    out = {}
    for k, v in sd.items():
        if not k.startswith("encoder."):
            continue
        k = k[len("encoder."):]
        if k.endswith(".kernel"):
            k = k[: -len(".kernel")] + ".weight"
            if v.ndim == 3:
                kk, cin, cout = v.shape
                ks = math.isqrt(kk)
                v = v.permute(2, 1, 0).reshape(cout, cin, ks, ks).transpose(3, 2)
            else:
                kk, c = v.shape
                ks = math.isqrt(kk)
                v = v.permute(1, 0).reshape(c, 1, ks, ks).transpose(3, 2)
        else:
            k = re.sub(r"\.(ln|linear)\.", ".", k)
            if ".grn." in k:  # MinkowskiGRN (1, C) -> the official dense (1, 1, 1, C)
                v = v.reshape(1, 1, 1, -1)
            elif k.endswith("bias") and v.ndim != 1:
                v = v.reshape(-1)
        out[k] = v.contiguous()
    return out


# The official FCMAE's MinkowskiEngine modules: their parameter names and shapes around the dense ones.
_MINKOWSKI_WRAPPED = re.compile(r"(downsample_layers\.[1-9]\d*\.0|stages\.\d+\.\d+\.norm)\.(weight|bias)$")
_MINKOWSKI_LINEAR = re.compile(r"stages\.\d+\.\d+\.pwconv[12]\.(weight|bias)$")
_MINKOWSKI_CONV = re.compile(r"(downsample_layers\.[1-9]\d*\.1|stages\.\d+\.\d+\.dwconv)\.(weight|bias)$")


def _official_to_minkowski(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official dense encoder keys -> the FCMAE encoder's MinkowskiEngine keys and shapes (the inverse of
    `remap_checkpoint_keys`): conv kernels (k*k, in, out), depthwise (k*k, C), conv biases and GRN (1, C),
    `.ln.` / `.linear.` wrappers; the stem stays a dense Conv2d + LayerNorm."""
    out = {}
    for k, v in sd.items():
        if (m := _MINKOWSKI_CONV.match(k)) is not None:
            if m.group(2) == "weight":
                cout, cin, kh, kw = v.shape
                v = (v.transpose(3, 2).reshape(cout, kh * kw).permute(1, 0) if ".dwconv" in k
                     else v.transpose(3, 2).reshape(cout, cin, kh * kw).permute(2, 1, 0))
                k = m.group(1) + ".kernel"
            else:
                v = v.reshape(1, -1)
        elif (m := _MINKOWSKI_WRAPPED.match(k)) is not None:
            k = f"{m.group(1)}.ln.{m.group(2)}"
        elif (m := _MINKOWSKI_LINEAR.match(k)) is not None:
            k = k[: -len(m.group(1))] + "linear." + m.group(1)
        elif ".grn." in k:
            v = v.reshape(1, -1)
        out["encoder." + k] = v.contiguous()
    return out


def _decoder_keys(sd: Mapping[str, torch.Tensor], official: bool) -> dict[str, torch.Tensor]:
    """proj, mask_token, decoder.*, pred: the same names in both layouts; the decoder's GRN is (1, 1, 1, C)
    in the official dense block and (C,) in ours."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("proj.", "pred.", "decoder.")) or k == "mask_token":
            if k.startswith("decoder.") and ".grn." in k:
                v = v.reshape(1, 1, 1, -1) if official else v.reshape(-1)
            out[k] = v
    return out


def fcmae_from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full official FCMAE pre-training state dict (encoder + decoder) -> our FCMAE model's keys."""
    encoder = _rename(_fcmae_to_official(sd), "official", to_ours=True)
    encoder = {k: v.reshape(-1) if ".grn." in k else v for k, v in encoder.items()}  # (1, 1, 1, C) -> ours (C,)
    return {**{"encoder." + k: v for k, v in encoder.items()}, **_decoder_keys(sd, official=False)}


def fcmae_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our FCMAE model's state dict -> the official FCMAE layout (`encoder.*` MinkowskiEngine keys, `proj`,
    `mask_token`, `decoder.*`, `pred`), which the official `remap_checkpoint_keys` turns into a dense encoder."""
    encoder = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "stem.conv.weight" not in encoder or "mask_token" not in sd:
        raise CheckpointError("not an FCMAE pre-training model (needs encoder.* and mask_token): "
                              f"{_preview(list(sd))}")
    return {**_official_to_minkowski(_rename(encoder, "official", to_ours=False)), **_decoder_keys(sd, official=True)}


def to_ours(sd: Mapping[str, torch.Tensor], fmt: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Convert an unwrapped state dict of any supported layout to ours; returns (format, state dict).

    An FCMAE pre-training model (official, or ours from `convnext pretrain`) gives its encoder.
    """
    fmt = fmt or detect_format(sd)
    if fmt == "ours":
        return fmt, dict(sd)
    if fmt == "fcmae":
        if "encoder.stem.conv.weight" in sd:  # ours: the encoder's keys under `encoder.`
            return fmt, {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        return fmt, _rename(_fcmae_to_official(sd), "official", to_ours=True)
    if fmt == "hf":
        sd = {re.sub(r"^convnext(v2)?\.", "", k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("pooler")}
    return fmt, _rename(sd, fmt, to_ours=True)


def from_ours(sd: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Convert our state dict to another layout (official, official_isotropic, timm, torchvision, hf)."""
    if fmt == "ours":
        return dict(sd)
    if fmt not in TABLES:
        raise ValueError(f"cannot export to {fmt!r}; choose one of {sorted(TABLES)}")
    out = _rename(sd, fmt, to_ours=False)
    stem = sd.get("stem.conv.weight")
    if fmt == "timm" and stem is not None and stem.shape[0] <= 80:  # timm builds atto .. nano (V1 and V2) with
        out = {k: v[:, :, None, None] if re.search(r"mlp\.fc[12]\.weight$", k) else v  # 1x1-conv MLPs
               for k, v in out.items()}                                                # (conv_mlp=True)
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Architecture of a state dict in our layout: ("ConvNeXt" | "ConvNeXtIsotropic", config fields).

    `num_classes` is absent when the checkpoint has no classifier (FCMAE pre-training).
    """
    cfg: dict[str, Any] = {}
    has_ls = any(re.search(r"blocks\.\d+\.gamma$", k) for k in sd)
    cfg["use_grn"] = any(k.endswith("grn.gamma") for k in sd)
    if "stem.conv.weight" in sd:
        arch, stem = "ConvNeXt", sd["stem.conv.weight"]
        blocks: dict[int, set[int]] = {}
        dims: dict[int, int] = {}
        for k, v in sd.items():
            m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.dwconv\.weight$", k)
            if m:
                i, j = int(m.group(1)), int(m.group(2))
                blocks.setdefault(i, set()).add(j)
                dims[i] = v.shape[0]
        n = len(blocks)
        if n == 0 or sorted(blocks) != list(range(n)) or any(blocks[i] != set(range(len(blocks[i]))) for i in blocks):
            raise CheckpointError("checkpoint stages/blocks are not numbered 0..n-1")
        cfg["depths"] = tuple(len(blocks[i]) for i in range(n))
        cfg["dims"] = tuple(dims[i] for i in range(n))
    elif "stem.weight" in sd:
        arch, stem = "ConvNeXtIsotropic", sd["stem.weight"]
        cfg["depth"] = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        cfg["dim"] = stem.shape[0]
    else:
        raise CheckpointError("checkpoint has no stem weights")
    cfg["in_chans"] = stem.shape[1]
    cfg["patch_size"] = stem.shape[-1]
    cfg["ls_init_value"] = 1e-6 if has_ls else None  # the value itself comes from the checkpoint
    if "head.fc.weight" in sd:
        cfg["num_classes"] = sd["head.fc.weight"].shape[0]
    elif "head.norm.weight" in sd:
        cfg["num_classes"] = 0
    return arch, cfg


def _match_arch(cls_name: str, cfg: dict[str, Any]) -> str | None:
    """Registered name whose architecture equals the inferred config (ignoring head/drop path).

    The family must match too (GRN or not); LayerScale breaks ties (isotropic S/B have none, L has it).
    """
    keys = ("depths", "dims", "depth", "dim", "use_grn")
    same = [name for name, (cls, base) in MODELS.items()
            if cls.__name__ == cls_name and all(getattr(base, k) == cfg[k] for k in keys if k in cfg)]
    has_ls = cfg.get("ls_init_value") is not None
    return next((n for n in same if bool(MODELS[n][1].ls_init_value) == has_ls), same[0] if same else None)


def infer_model_name(state_dict: Mapping[str, Any], source: object = "checkpoint") -> str:
    """The registered architecture of a state dict in our layout, or CheckpointError naming `source`."""
    cls_name, cfg = infer_config(state_dict)
    name = _match_arch(cls_name, cfg)
    if name is None:
        raise CheckpointError(f"{source}: architecture {cfg} matches no registered model; name the model explicitly")
    return name

