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
    if file.layout in ("mmseg", "mmdet"):  # an official UperNet or (Cascade) Mask R-CNN checkpoint, whole
        from ..weights.dense_official import detector_from_official, segmenter_from_official

        sd = segmenter_from_official(sd) if file.layout == "mmseg" else detector_from_official(sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{file.path}: weights do not fit the {task} model they describe "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), file.spec


def read_official(pretrained: Any, name: str, task: str, arch: str | None = None) -> dict[str, Any] | None:
    """Our state dict of an official UperNet (`task` "segment"), Mask R-CNN or Cascade Mask R-CNN ("detect", the
    detector `arch` being built) file given as `pretrained`; None for anything else (another checkpoint
    initialises the backbone only). An official file on another backbone than `name`, or of another detector than
    `arch`, is an error."""
    from ..weights import CheckpointError, read_checkpoint
    from ..weights import dense_official as official

    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)) or not os.path.isfile(pretrained):
        return None
    obj, _ = read_checkpoint(pretrained)
    sd = obj.get("state_dict", obj) if hasattr(obj, "get") else obj
    seg = task == "segment"
    if not (official.is_official_segmenter(sd) if seg else official.is_official_detector(sd)):
        return None
    spec = official.official_segmenter_spec(sd) if seg else official.official_detector_spec(sd)
    what = "an UperNet" if seg else official.DETECTOR_NAMES[spec["arch"]]
    if spec["model_name"] != name:
        raise CheckpointError(f"{pretrained} is {what} on {spec['model_name']}, not {name}")
    if not seg and arch is not None and spec["arch"] != arch:
        raise CheckpointError(f"{pretrained} is {what}, not {official.DETECTOR_NAMES.get(arch, arch)}: build it with "
                              f"arch={spec['arch']!r} (--arch {spec['arch']})")
    return official.segmenter_from_official(sd) if seg else official.detector_from_official(sd)


def load_whole(model: nn.Module, sd: dict[str, Any], path: Any, what: str, classifiers: tuple[str, ...],
               num_classes: int) -> None:
    """Every tensor of an official file into `model`; the `classifiers` (key prefixes) may differ in shape only
    (another number of classes: they start afresh, said in the log). Anything else that does not fit is an error."""
    import logging

    from ..weights import CheckpointError

    own = model.state_dict()
    fresh = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape and k.startswith(classifiers))
    shapes = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape and k not in fresh)
    if shapes:
        raise CheckpointError(f"{path}: the {what} in it is not this one: {shapes[0]} is {tuple(sd[shapes[0]].shape)} "
                              f"there, {tuple(own[shapes[0]].shape)} here (other head widths)")
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if k not in fresh}, strict=False)
    if sorted(missing) != fresh or unexpected:
        raise CheckpointError(f"{path}: the {what} in it is not this one (missing {sorted(set(missing) - set(fresh))[:3]}, "
                              f"unexpected {unexpected[:3]}): its heads differ (widths, auxiliary head)")
    if fresh:
        logging.getLogger(__name__).info("%s: every tensor loaded but the classifiers (%s), new for %d classes",
                                         path, ", ".join(fresh), num_classes)
