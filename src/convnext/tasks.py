"""The task registry: one `TaskSpec` per task, found by its name, for the CLI, the demo, evaluation and prediction.

A task module (classification, detection, segmentation, FCMAE pre-training, or one of yours) declares
one `TaskSpec`: its config and `Task` classes (training on the engine), how its model is rebuilt from a
checkpoint, how a checkpoint is evaluated and an image predicted, how results are shown, and its demo.
`convnext NAME train|eval|predict` is then generated from the spec; nothing else names the task.

Adding a task is one module that calls `register(TaskSpec(...))` at import, plus one line in `BUILTIN`
(or an entry point in the `convnext.tasks` group of an installed package, or just importing the module
before `convnext.cli.main` runs: `tests/test_engine.py` does that).
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# name -> the module that registers it (imported on first use, so that the CLI starts fast)
BUILTIN = {
    "classify": "convnext.train.classification",
    "detect": "convnext.train.detection",
    "segment": "convnext.train.segmentation",
    "pretrain": "convnext.train.pretrain",
}
ENTRY_POINTS = "convnext.tasks"  # third-party tasks: an entry point naming the module that registers them
_REGISTRY: dict[str, TaskSpec] = {}


@dataclass(frozen=True)
class Option:
    """One command-line option of a task's eval, predict or demo command: argparse's `add_argument`
    arguments; its `dest` is the keyword the task's function receives."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser | Any) -> None:
        parser.add_argument(*self.flags, **self.kwargs)

    @property
    def dest(self) -> str:
        if "dest" in self.kwargs:
            return self.kwargs["dest"]
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")


def opt(*flags: str, **kwargs: Any) -> Option:
    return Option(tuple(flags), kwargs)


def lazy(target: str) -> Callable[..., Any]:
    """The function `module:name`, imported at its first call: a task module stays light to import (the CLI
    parser imports every task's) while its spec names the functions of eval/ and dense/ it uses."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__, call.__qualname__ = name, target
    return call


@dataclass(frozen=True)
class TaskSpec:
    """Everything outside the training loop that differs between tasks.

    - `name`: the registry key, the `task` in the header of its files, and the command `convnext NAME`.
    - `config`, `task`: the config dataclass (`convnext NAME train` flags come from its fields) and the
      `train.task.Task` subclass the engine trains.
    - `load(checkpoint, key=None) -> (model in eval mode, info)`: the model a checkpoint's header spec
      rebuilds, with what inference needs (classes, preprocessing).
    - `evaluate(checkpoint, data, *, batch_size, workers, precision, progress, **eval options) -> results`;
      `format_results(results, style)` -> the text or JSON `convnext NAME eval` prints.
    - `predictor(checkpoint, paths, **predict options) -> Predictor`: callable on lists of at most its
      `batch_size` image paths, one result dict per image (an `error` key for an unreadable one),
      `finish()` after the last; `format_predictions(results, style)`.
    - `summarize(summary) -> str`: the line `convnext NAME train` prints at the end.
    - `demo(**options) -> result`: the task's demo (`convnext demo --task DEMO_NAME`), or None.
    """

    name: str
    help: str
    config: type
    task: type
    load: Callable[..., tuple[Any, Any]] | None = None
    evaluate: Callable[..., dict[str, Any]] | None = None  # None: no `eval` command
    format_results: Callable[[dict[str, Any], str], str] = lambda res, style: json.dumps(res)
    predictor: Callable[..., Any] | None = None  # None: no `predict` command
    format_predictions: Callable[[list[dict[str, Any]], str], str] = lambda results, style: "\n".join(
        json.dumps(r) for r in results if "error" not in r)
    summarize: Callable[[dict[str, Any]], str] = lambda s: (
        f"done: {s['model']} epoch {s.get('epoch', 0)}  best {s['best_metric']} {s['best']}  -> {s['output']}")
    demo: Callable[..., Any] | None = None
    demo_name: str | None = None  # name under `convnext demo --task` (default: `name`)
    eval_options: tuple[Option, ...] = ()
    predict_options: tuple[Option, ...] = ()
    predict_styles: tuple[str, ...] = ("text", "json")  # --json, and any other style as --STYLE
    demo_options: tuple[Option, ...] = ()
    eval_batch_size: int = 64
    top_level: bool = False  # its train/eval/predict are also `convnext train|eval|predict` (classification)
    default_action: str | None = None  # `convnext NAME ...` without an action means this one (pretrain: train)


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task (a module's last line: `SPEC = register(TaskSpec(...))`); a second spec of one name is refused."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec and old.task is not spec.task:
        raise ValueError(f"a task named {spec.name!r} is registered already ({old.task.__module__})")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    for module in BUILTIN.values():
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        importlib.import_module(ep.value.split(":", 1)[0])


def get_task(name: str) -> TaskSpec:
    """The spec of task `name` (its module is imported on first use)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(list_tasks())}")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    """Every registered task: the built-in ones first, then the rest in registration order."""
    _load_builtin()
    return [*[n for n in BUILTIN if n in _REGISTRY], *[n for n in _REGISTRY if n not in BUILTIN]]


def demo_task(name: str) -> TaskSpec:
    """The task whose demo is `convnext demo --task name`."""
    for task in list_tasks():
        spec = _REGISTRY[task]
        if spec.demo is not None and (spec.demo_name or spec.name) == name:
            return spec
    raise ValueError(f"no demo named {name!r}; the demos are {', '.join(demo_names())}")


def demo_names() -> list[str]:
    return [s.demo_name or s.name for s in map(_REGISTRY.__getitem__, list_tasks()) if s.demo is not None]


def pick(options: Sequence[Option], values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `options` declare, from parsed `values`."""
    return {o.dest: values[o.dest] for o in options if o.dest in values}


__all__ = ["BUILTIN", "Option", "TaskSpec", "demo_names", "demo_task", "get_task", "lazy", "list_tasks", "opt",
           "pick", "register"]
