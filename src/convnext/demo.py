"""The main job, `convnext demo`: a task's demo, found through the task registry.

`convnext demo` (the classification demo: convnext_atto on the embedded Fashion-MNIST, then evaluate,
predict, summarise) is `run_demo()`; `--task detect|segment|fcmae` runs that task's demo. Each demo
lives with its task (`train/classification.py`, `train/scenes_demo.py`, `train/fcmae_demo.py`).
"""

from __future__ import annotations

from typing import Any


def run_demo(output: str | None = None, *, task: str = "classify", **options: Any) -> Any:
    """Run the demo named `task` (`tasks.demo_names()`) with its options (`output`, `epochs`, `force`, and
    the task's own: `per_class`; `backbone`, `scenes`; `pretrain_epochs`)."""
    from .tasks import demo_task

    spec = demo_task(task)
    return spec.demo(output=output, **options)


def run_dense_demo(task: str, output: str | None = None, **options: Any) -> Any:
    """`convnext demo --task detect|segment` (the name before the registry)."""
    return run_demo(output, task=task, **options)


def run_fcmae_demo(output: str | None = None, **options: Any) -> Any:
    """`convnext demo --task fcmae` (the name before the registry)."""
    return run_demo(output, task="fcmae", **options)
