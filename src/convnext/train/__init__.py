"""Training: one engine for every task (`engine.fit`), the classification task, config, optimizer, schedule."""

from .config import ClassifyConfig, DenseConfig, EngineConfig, TrainConfig
from .task import Task

__all__ = ["ClassificationTask", "ClassifyConfig", "DenseConfig", "EngineConfig", "NonFiniteLossError", "PeerLostError",
           "Task", "TrainConfig", "fit"]


def __getattr__(name: str):
    # The engine and the classification task pull in torchvision (~1.5 s): import them when used, so
    # that building the CLI parser (which needs only the config) stays fast for every command.
    if name in ("fit", "NonFiniteLossError", "PeerLostError"):
        from . import engine

        return getattr(engine, name)
    if name == "ClassificationTask":
        from .classification import ClassificationTask

        return ClassificationTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
