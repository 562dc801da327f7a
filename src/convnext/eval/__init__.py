"""Evaluation (top-1/top-5, loss, per-class accuracy, confusion matrix) and prediction."""

from .metrics import autocast, evaluate
from .predict import load_for_inference, predict

__all__ = ["autocast", "evaluate", "load_for_inference", "predict"]
