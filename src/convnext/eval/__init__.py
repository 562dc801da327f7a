"""Evaluation (top-1/top-5, loss, per-class accuracy, confusion matrix) and prediction."""

from .classify import evaluate_checkpoint, format_results
from .metrics import evaluate
from .predict import (ClassifierPredictor, InferenceInfo, format_predictions, load_for_inference, predict,
                      predict_files, predict_images, run_predictor)

__all__ = [
    "ClassifierPredictor", "InferenceInfo", "evaluate", "evaluate_checkpoint", "format_predictions", "format_results",
    "load_for_inference", "predict", "predict_files", "predict_images", "run_predictor",
]
