"""Loading weights into a model (strictly, with the documented adaptations) and saving ours."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .convert import from_ours, to_ours
from .header import read_model_file, write_model_file
from .io import CheckpointError

logger = logging.getLogger(__name__)

def read_state_dict(src: str | os.PathLike | Mapping[str, Any], *, key: str | None = None
                    ) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Any supported checkpoint (path or already-loaded dict) -> (layout, our state dict, free metadata)."""
    file = read_model_file(src)
    fmt, sd = to_ours(file.state_dict(key))
    return fmt, sd, file.metadata


def _adapt_in_chans(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Stem weights for another number of input channels (timm's rule).

    1 channel: sum over RGB (a grey image gives the same activations as its RGB copy). Otherwise
    tile the pretrained channels and rescale so activations keep their magnitude.
    """
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def _layout_reshape(key: str, have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether `have` -> `want` is a documented layout difference of `key` between checkpoint formats.

    timm's conv-MLP models (atto..nano) store the MLP Linears as 1x1 convs (out, in, 1, 1); the
    official and Hugging Face files store GRN's gamma/beta as (1, 1, 1, C); torchvision stores
    LayerScale as (C, 1, 1). Nothing else is reshaped: any other shape difference is an error.
    """
    if key.endswith(("pwconv1.weight", "pwconv2.weight")):
        return have == (*want, 1, 1)
    if key.endswith(("grn.gamma", "grn.beta")):
        return len(want) == 1 and have == (1, 1, 1, want[0])
    if key.endswith(".gamma"):
        return len(want) == 1 and have == (want[0], 1, 1)
    return False


def load_state_dict_into(model: nn.Module, sd: Mapping[str, torch.Tensor], *, adapt: bool = False,
                         allow_missing_head: bool = False) -> None:
    """Strictly load a state dict in our layout into `model`.

    Only the documented layout differences (`_layout_reshape`) are reshaped. With `adapt`, a
    different number of classes (same feature width) re-initialises the classifier and a different
    number of input channels adapts the stem, each logged; every other mismatch raises, listing the keys.
    """
    target = model.state_dict()
    sd = dict(sd)
    if getattr(model, "features_only", False):  # no head; stages after the last output are not built
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")
              and not (k.startswith("stages.") and int(k.split(".")[1]) >= len(model.stages))}
    stem_key = "stem.conv.weight" if "stem.conv.weight" in target else "stem.weight"
    if adapt and stem_key in sd and sd[stem_key].shape[1] != target[stem_key].shape[1]:
        logger.info("adapting stem from %d to %d input channels", sd[stem_key].shape[1], target[stem_key].shape[1])
        sd[stem_key] = _adapt_in_chans(sd[stem_key], target[stem_key].shape[1])
    head_keys = ("head.fc.weight", "head.fc.bias")
    ckpt_head, model_head = sd.get("head.fc.weight"), target.get("head.fc.weight")
    if (adapt and ckpt_head is not None and ckpt_head.ndim == 2 and ckpt_head.shape != getattr(model_head, "shape", None)
            and (model_head is None or ckpt_head.shape[1] == model_head.shape[1])):
        n_model = model_head.shape[0] if model_head is not None else 0
        logger.info("classifier re-initialised: checkpoint has %d classes, model %d "
                    "(pass num_classes=%d to keep the pretrained classifier)", ckpt_head.shape[0], n_model,
                    ckpt_head.shape[0])
        for k in head_keys:
            sd.pop(k, None)
        allow_missing_head = True
    mismatched = []
    for k, v in list(sd.items()):
        if k in target and v.shape != target[k].shape:
            if _layout_reshape(k, tuple(v.shape), tuple(target[k].shape)):
                sd[k] = v.reshape(target[k].shape)
            else:
                mismatched.append(f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}")
    allowed = set(head_keys) if allow_missing_head else set()
    if allow_missing_head and "head.norm.weight" not in sd:  # FCMAE encoders carry no final norm either
        allowed |= {"head.norm.weight", "head.norm.bias"}
    missing = sorted(set(target) - set(sd) - allowed)
    unexpected = sorted(set(sd) - set(target))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {_short(mismatched)}")
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(parts))
    skipped = sorted(set(target) - set(sd))
    if skipped:
        logger.info("kept initial values for %s (not in checkpoint)", ", ".join(skipped))
    model.load_state_dict(sd, strict=False)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_checkpoint(model: nn.Module, src: str | os.PathLike | Mapping[str, Any], *,
                    key: str | None = None, adapt: bool = False) -> str:
    """Load any supported checkpoint into `model` strictly; returns the detected format.

    Formats: official V1/V2 (incl. `{'model': ...}` / `{'model_ema': ...}` wrappers and FCMAE
    pre-training encoders), timm, torchvision, Hugging Face `ConvNext*`/`ConvNextV2*`, and ours;
    files `.pth`, `.pt`, `.bin`, `.safetensors` or a Hugging Face model directory.
    """
    fmt, sd, _ = read_state_dict(src, key=key)
    load_state_dict_into(model, sd, adapt=adapt, allow_missing_head=fmt == "fcmae")
    return fmt


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, fmt: str = "ours",
                    extra_metadata: Mapping[str, Any] | None = None,
                    state_dict: Mapping[str, torch.Tensor] | None = None,
                    classes: list[str] | None = None, preprocess: Mapping[str, Any] | None = None) -> None:
    """Write the model's weights as safetensors (atomically) with the header (`weights.header`): task
    "classify", spec = its name and config (and `classes`, `preprocess` when given).

    `fmt="official"` (or timm, torchvision, hf, official_isotropic) writes that key layout instead, so
    weights trained here can go back to other tools. `state_dict` replaces `model.state_dict()`
    (e.g. the gathered full weights of a sharded model); `extra_metadata`: free keys (epoch, metrics).
    """
    extra = dict(extra_metadata or {})

    def given(key: str, value: Any) -> Any:  # classes/preprocess passed as metadata (as before version 3)
        raw = extra.pop(key, None)
        return value if raw is None else json.loads(raw) if isinstance(raw, str) else raw

    classes, preprocess = given("classes", classes), given("preprocess", preprocess)
    spec: dict[str, Any] = {"model_name": getattr(model, "model_name", None)}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        spec["model_config"] = asdict(cfg)
    if classes is not None:
        spec["classes"] = list(classes)
    if preprocess is not None:
        spec["preprocess"] = dict(preprocess)
    sd = from_ours(model.state_dict() if state_dict is None else state_dict, fmt)
    write_model_file(path, "classify", spec, sd, layout=fmt, metadata=extra)
