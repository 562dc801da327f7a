"""AdamW parameter groups: one builder for every task, with a layer-id function for layer-wise lr decay.

`build_param_groups(model, weight_decay, layer_of=..., decay_rate=..., skip_decay=...)` puts each trainable
parameter into a group by (layer id, decayed or not): `lr_scale = decay_rate ** (num_layers + 1 - id)`
multiplies the scheduled lr each step, `weight_decay` is 0 where `skip_decay` says so. The layer ids are
the official ones (`layer_id`): the classification optim_factory's ("group" for V1, "single" for V2) and
the det/seg optimizer constructor's ("layer_wise" = "group" on the backbone with its `num_layers`,
"stage_wise"); necks and heads take the base rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """The official rule: no weight decay on biases, norm weights, LayerScale and GRN's gamma/beta (every
    parameter with fewer than 2 dimensions, and GRN's whatever their shape)."""
    return p.ndim <= 1 or name.endswith((".bias", ".gamma", ".beta"))


def layer_id(name: str, depths: tuple[int, ...], kind: str = "group", num_layers: int | None = None
             ) -> tuple[int, int]:
    """(layer id, number of layers) of a parameter of a ConvNeXt (our names), as the official code assigns them.

    "group" (ConvNeXt V1; "layer_wise" in the det/seg code): stem 0, stage 0 -> 1, stage 1 (+ its
    downsampling) -> 2, downsampling into stage 2 -> 3, stage 2 in groups of three blocks -> 3 + b // 3,
    stage 3 (+ its downsampling) -> the last id, head -> that + 1. For depths (3, 3, 27, 3) this is
    exactly the official 12 groups; other sizes get ceil(depths[2] / 3) groups in stage 2 (`num_layers`
    overrides the count, as the det/seg configs do). "single" (ConvNeXt V2): one id per block,
    downsampling with the first block of its stage. "stage_wise" (segmentation): the stem and every
    downsampling 0, stage s -> s + 1, the rest `num_layers` (6 for T, 12 for S/B/L/XL) + 1. Isotropic models (`depths` =
    (depth,)) get one id per block, stem 0.
    """
    parts = name.split(".")
    if len(depths) == 1:  # isotropic: stem, blocks.{j}, head
        n = depths[0]
        if parts[0] == "stem":
            return 0, n
        return (int(parts[1]) + 1 if parts[0] == "blocks" else n + 1), n
    stage = int(parts[1]) if parts[0] == "stages" else None
    block = int(parts[3]) if stage is not None and parts[2] == "blocks" else None
    if kind == "single":
        n = sum(depths)
        if parts[0] == "stem":
            return 1, n
        return (sum(depths[:stage]) + (block or 0) + 1 if stage is not None else n + 1), n
    if kind == "stage_wise":  # num_layers as the official ADE20K configs: 6 for T (depth 9), 12 for S/B/L/XL
        n = (3 + math.ceil(depths[2] / 3)) if num_layers is None else num_layers
        if parts[0] == "stem" or (stage is not None and block is None):
            return 0, n
        return (stage + 1 if stage is not None else n + 1), n
    last = num_layers if num_layers is not None else 3 + (math.ceil(depths[2] / 3) if len(depths) > 2 else 0)
    if parts[0] == "stem":
        return 0, last
    if stage is None:
        return last + 1, last
    if block is None:  # downsampling into stage 1, 2 (the ids of their stages' first layer) or 3
        return (stage + 1 if stage in (1, 2) else last), last
    return {0: 1, 1: 2, 2: 3 + block // 3}.get(stage, last), last


def build_param_groups(model: nn.Module, weight_decay: float, *, layer_of: Callable[[str], tuple[int, int]] | None = None,
                 decay_rate: float = 1.0, skip_decay: Callable[[str, nn.Parameter], bool] = no_weight_decay
                 ) -> list[dict]:
    """AdamW groups (`params`, `names`, `weight_decay`, `lr_scale`), one per (layer id, decayed or not).

    `layer_of(name) -> (layer id, number of layers)` (None: one layer, lr scale 1); `skip_decay(name, p)`
    decides which parameters get no weight decay.
    """
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = skip_decay(name, p)
        lid, scale = 0, 1.0
        if layer_of is not None:
            lid, n = layer_of(name)
            scale = decay_rate ** (n + 1 - lid)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 layer_decay_type: str = "group") -> list[dict]:
    """A ConvNeXt classifier's groups: layer decay by `layer_id` of its depths when `layer_decay` < 1."""
    if layer_decay >= 1.0:
        return build_param_groups(model, weight_decay)
    cfg = model.cfg
    depths = tuple(cfg.depths) if hasattr(cfg, "depths") else (cfg.depth,)
    return build_param_groups(model, weight_decay, layer_of=lambda name: layer_id(name, depths, layer_decay_type),
                        decay_rate=layer_decay)


def dense_param_groups(model: nn.Module, weight_decay: float, decay_rate: float = 1.0, decay_type: str = "layer_wise",
                       num_layers: int | None = None, depths: tuple[int, ...] | None = None) -> list[dict]:
    """A detector's or segmenter's groups, as the official det/seg optimizer constructor
    (`mmcv_custom/layer_decay_optimizer_constructor.py`): `layer_id` of the backbone's parameters (names
    after `body.`; `num_layers` default 6 for T and 12 for S/B/L/XL, as every official det and seg config),
    everything else (the backbone's output norms, neck, heads) `num_layers` + 1."""
    if decay_type not in ("layer_wise", "stage_wise"):
        raise ValueError(f"decay_type must be one of layer_wise, stage_wise, got {decay_type!r}")
    depths = depths or (3, 3, 9, 3)
    if num_layers is None:
        num_layers = layer_id("head", depths, decay_type)[1]

    def layer_of(name: str) -> tuple[int, int]:
        if ".body." not in f".{name}":
            return num_layers + 1, num_layers
        return layer_id(f".{name}".split(".body.", 1)[1], depths, decay_type, num_layers)

    return build_param_groups(model, weight_decay, layer_of=layer_of, decay_rate=decay_rate,
                              skip_decay=lambda name, p: p.ndim == 1 or name.endswith(".bias"))
