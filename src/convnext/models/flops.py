"""Parameter and multiply-accumulate counts, via `torch.utils.flop_counter`."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int | tuple[int, int] = 224, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass: the papers' "FLOPs" (fvcore convention).

    Counts convolutions and matrix products; works on a model built on the `meta` device, so even
    convnextv2_huge is counted without allocating memory.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    p = next(model.parameters())
    x = torch.empty(batch_size, model.cfg.in_chans, h, w, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2
