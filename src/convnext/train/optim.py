"""AdamW parameter groups: no weight decay on 1-D parameters, layer-wise lr decay for fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn


def layer_id(name: str, depths: tuple[int, ...], kind: str = "group") -> tuple[int, int]:
    """(layer id, number of layers) of a parameter, as the official optim_factory assigns them.

    "group" (ConvNeXt V1): stem 0, stage 0 -> 1, stage 1 (+ its downsampling) -> 2, downsampling
    into stage 2 -> 3, stage 2 in groups of three blocks -> 3 + b // 3, stage 3 -> the last block
    id, head -> that + 1. For depths (3, 3, 27, 3) this is exactly the official 12 groups; other
    sizes get ceil(depths[2] / 3) groups in stage 2. "single" (ConvNeXt V2): one id per block,
    downsampling with the first block of its stage.
    Isotropic models (`depths` = (depth,)) get one id per block, stem 0.
    """
    parts = name.split(".")
    if len(depths) == 1:  # isotropic: stem, blocks.{j}, head
        n = depths[0]
        if parts[0] == "stem":
            return 0, n
        if parts[0] == "blocks":
            return int(parts[1]) + 1, n
        return n + 1, n
    if kind == "single":
        n = sum(depths)
        if parts[0] == "stem":
            return 1, n
        if parts[0] == "stages":
            s = int(parts[1])
            b = int(parts[3]) if parts[2] == "blocks" else 0
            return sum(depths[:s]) + b + 1, n
        return n + 1, n
    groups2 = math.ceil(depths[2] / 3) if len(depths) > 2 else 0
    last = 3 + groups2  # 12 for depths[2] = 27
    if parts[0] == "stem":
        return 0, last
    if parts[0] == "stages":
        s = int(parts[1])
        if parts[2] == "downsample":
            return (s + 1 if s in (1, 2) else last), last
        b = int(parts[3])
        if s in (0, 1):
            return s + 1, last
        if s == 2:
            return 3 + b // 3, last
        return last, last
    return last + 1, last


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 layer_decay_type: str = "group") -> list[dict]:
    """Groups with `weight_decay` and `lr_scale` (multiplies the scheduled lr each step).

    No weight decay on biases, norm weights, LayerScale gamma and GRN gamma/beta: every parameter
    with fewer than 2 dimensions (plus GRN's, whatever their shape), as the official code.
    """
    if layer_decay < 1.0:
        cfg = model.cfg  # a ConvNeXt: layer ids follow its depths
        depths = tuple(cfg.depths) if hasattr(cfg, "depths") else (cfg.depth,)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith((".bias", ".gamma", ".beta"))
        if layer_decay < 1.0:
            lid, n = layer_id(name, depths, layer_decay_type)
            scale = layer_decay ** (n + 1 - lid)
        else:
            lid, scale = 0, 1.0
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, layer_decay: float = 1.0, layer_decay_type: str = "group"
                    ) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay, layer_decay_type)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
