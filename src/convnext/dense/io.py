"""Saving and loading trained detectors and segmenters: the weights plus a `spec` (task, backbone, head,
classes, input sizes) from which the model is rebuilt, as safetensors metadata or inside a training
checkpoint (`dense_spec`). Read through the library's one safe reader."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

DENSE_FORMAT = "convnext-dense"


def build_from_spec(spec: dict[str, Any], pretrained: str | os.PathLike | bool | None = None,
                    drop_path_rate: float = 0.0, frozen_stages: int = -1) -> nn.Module:
    """The detector or segmenter a spec describes (fresh weights, or the backbone from `pretrained`)."""
    from .detection import create_detector
    from .segmentation import create_segmenter

    common = dict(pretrained=pretrained, drop_path_rate=drop_path_rate, frozen_stages=frozen_stages)
    if spec["task"] == "detect":
        min_size = spec["train_sizes"] if spec.get("train_sizes") else spec["min_size"]
        return create_detector(spec["model"], len(spec["classes"]), arch=spec["arch"], min_size=min_size,
                               max_size=spec["max_size"], **common, **spec.get("options", {}))
    return create_segmenter(spec["model"], len(spec["classes"]), head=spec["head"], aux_head=spec["aux_head"],
                            channels=spec.get("channels"), **common)


def save_dense(path: str | os.PathLike, spec: dict[str, Any], state_dict: dict[str, torch.Tensor],
               extra: dict[str, Any] | None = None) -> None:
    from ..weights.io import write_safetensors

    write_safetensors(path, state_dict, {"format": DENSE_FORMAT, "spec": json.dumps(spec), **(extra or {})})


def load_dense(path: str | os.PathLike, *, ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, spec) from `best.safetensors` or a training checkpoint (`last.pt`, `--ema` for its EMA)."""
    from ..weights import CheckpointError, read_checkpoint

    obj, metadata = read_checkpoint(path)
    if metadata.get("format") == DENSE_FORMAT:
        spec, sd = json.loads(metadata["spec"]), obj
    elif isinstance(obj.get("dense_spec"), dict):
        spec = obj["dense_spec"]
        sd = obj.get("model_ema") if ema else obj["model"]
        if sd is None:
            raise CheckpointError(f"{path}: this run kept no EMA weights; drop --ema")
        sd = {k.removeprefix("module."): v for k, v in sd.items() if k != "n_averaged"}
    else:
        raise CheckpointError(f"{path} is not a detection or segmentation checkpoint of convnext "
                              f"(best.safetensors or last.pt of `convnext detect|segment train`)")
    model = build_from_spec(spec)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the {spec['task']} model they describe "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), spec
