"""Learning-rate schedule: per-step linear warmup, then cosine decay (official `cosine_scheduler`)."""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based) of `total_steps`.

    Warmup goes linearly from 0 to `base_lr` over `warmup_steps` steps, both ends included
    (`np.linspace(0, base, warmup)` in the official code); the remaining steps follow
    min + (base - min) * (1 + cos(pi * i / n)) / 2, i = 0 .. n-1.
    """
    if step < warmup_steps:
        return base_lr * step / (warmup_steps - 1) if warmup_steps > 1 else base_lr
    n = max(1, total_steps - warmup_steps)
    i = min(step - warmup_steps, n - 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * i / n))
