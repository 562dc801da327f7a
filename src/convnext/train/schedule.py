"""Learning-rate schedules: the classification recipe's per-step linear warmup then cosine decay (official
`cosine_scheduler`), and the det/seg configs' mmcv schedules: "poly" (ADE20K: per iteration) and "step" (COCO
3x: x0.1 at epoch milestones), each with mmcv's linear warmup from `warmup_ratio` x the regular lr."""

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


SCHEDULES = ("cosine", "poly", "step")


def mmcv_lr_at(step: int, *, schedule: str, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
               warmup_ratio: float, steps_per_epoch: int = 1, milestones: tuple[int, ...] = (), gamma: float = 0.1,
               power: float = 1.0) -> float:
    """LR of optimizer step `step` (0-based) under mmcv's `PolyLrUpdaterHook` (by iteration: (base - min) *
    (1 - step / total) ** power + min) or `StepLrUpdaterHook` (by epoch: base * gamma ** (milestones passed)),
    with its linear warmup: during the first `warmup_steps` steps the regular lr times
    1 - (1 - step / warmup_steps) * (1 - warmup_ratio)."""
    if schedule == "poly":
        regular = (base_lr - min_lr) * (1 - step / total_steps) ** power + min_lr
    elif schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        regular = base_lr * gamma ** sum(epoch >= m for m in milestones)
    else:
        raise ValueError(f"schedule must be poly or step here, got {schedule!r}")
    if step < warmup_steps:
        return regular * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio))
    return regular
