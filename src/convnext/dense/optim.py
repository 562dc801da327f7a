"""Layer-wise learning-rate decay for dense fine-tuning, as the official det/seg optimizer constructor
(`mmcv_custom/layer_decay_optimizer_constructor.py`) assigns it; necks and heads at the base rate.

Layer ids, in our parameter names (the official names in brackets):
- "layer_wise" (detection; `num_layers` 6 for T, 12 otherwise): stem [downsample_layers.0] 0; stage 0 -> 1;
  stage 1 and its downsampling -> 2; downsampling into stage 2 -> 3, stage 2 blocks -> 3 + b // 3;
  stage 3 and its downsampling -> num_layers; everything else (norms, neck, heads) -> num_layers + 1.
- "stage_wise" (segmentation; `num_layers` 12): stem and every downsampling -> 0; stage s -> s + 1;
  everything else -> num_layers + 1.
lr scale = decay_rate ** (num_layers + 1 - id). No weight decay on 1-D parameters and biases (norms,
LayerScale, GRN, BatchNorm), as the official constructor.
"""

from __future__ import annotations

import math

from torch import nn

DECAY_TYPES = ("layer_wise", "stage_wise")


def default_num_layers(depths: tuple[int, ...], decay_type: str) -> int:
    """The official configs' `num_layers`: layer_wise 6 for T (9 blocks in stage 2), 12 for 27 blocks; stage_wise 12."""
    return 3 + math.ceil(depths[2] / 3) if decay_type == "layer_wise" else 12


def dense_layer_id(name: str, num_layers: int, decay_type: str) -> int:
    """The official layer id of a parameter of a dense model (its backbone's names contain `body.`)."""
    if ".body." not in f".{name}":
        return num_layers + 1
    parts = f".{name}".split(".body.", 1)[1].split(".")
    if decay_type == "stage_wise":
        if parts[0] == "stem" or (parts[0] == "stages" and parts[2] == "downsample"):
            return 0
        return int(parts[1]) + 1 if parts[0] == "stages" else num_layers + 1
    if parts[0] == "stem":
        return 0
    if parts[0] != "stages":
        return num_layers + 1
    s = int(parts[1])
    if parts[2] == "downsample":
        return {1: 2, 2: 3}.get(s, num_layers)
    return {0: 1, 1: 2, 2: 3 + int(parts[3]) // 3}.get(s, num_layers)


def dense_param_groups(model: nn.Module, weight_decay: float, decay_rate: float = 1.0, decay_type: str = "layer_wise",
                       num_layers: int | None = None, depths: tuple[int, ...] | None = None) -> list[dict]:
    """AdamW groups (`params`, `names`, `weight_decay`, `lr_scale`) for a detector or segmenter."""
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {', '.join(DECAY_TYPES)}, got {decay_type!r}")
    if num_layers is None:
        num_layers = default_num_layers(depths or (3, 3, 9, 3), decay_type)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias")
        lid = dense_layer_id(name, num_layers, decay_type)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": decay_rate ** (num_layers + 1 - lid)})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())
