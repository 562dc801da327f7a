"""Rebuilding a trained detector or segmenter from any of our files: the header's spec (backbone, head,
classes, input sizes) builds the model, the weights load strictly. Read through the one reader
(`weights.read_model_file`); written by the tasks with `weights.write_model_file`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn


def load_model(src: str | os.PathLike, task: str, build: Callable[[dict[str, Any]], nn.Module], *,
               key: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, spec) of a `task` file: `best.safetensors`, or a training state (`last.pt`; `key`
    "model_ema" for its EMA weights). A file of another task is an error naming the command for it."""
    from ..weights import CheckpointError, read_model_file

    file = read_model_file(src)
    if file.task != task:
        raise CheckpointError(f"{file.path} holds a {file.task} model, not a {task} model: "
                              f"use `convnext {file.task} eval|predict`")
    try:
        model = build(file.spec)
    except (KeyError, TypeError, ValueError) as e:  # a damaged or hand-edited spec
        raise CheckpointError(f"{file.path}: its header's spec does not describe a {task} model "
                              f"({type(e).__name__}: {e})") from None
    sd = file.state_dict(key)
    if file.layout in ("mmseg", "mmdet"):  # an official UperNet or Mask R-CNN checkpoint, whole
        from ..weights.dense_official import detector_from_official, segmenter_from_official

        sd = segmenter_from_official(sd) if file.layout == "mmseg" else detector_from_official(sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{file.path}: weights do not fit the {task} model they describe "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), file.spec
