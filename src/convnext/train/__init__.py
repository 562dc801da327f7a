"""Training: config, optimizer groups, schedule, checkpoints, distributed helpers and the loop."""

from .config import TrainConfig
from .loop import NonFiniteLossError, fit

__all__ = ["NonFiniteLossError", "TrainConfig", "fit"]
