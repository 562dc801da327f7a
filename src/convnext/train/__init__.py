"""Training: config, optimizer groups, schedule, checkpoints, distributed helpers and the loop."""

from .config import TrainConfig

__all__ = ["NonFiniteLossError", "TrainConfig", "fit"]


def __getattr__(name: str):
    # The loop pulls in torchvision (~1.5 s): import it when used, so that building the CLI parser
    # (which needs only the config) stays fast for every command.
    if name in ("fit", "NonFiniteLossError"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
