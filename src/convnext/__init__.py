"""ConvNeXt V1 and V2: faithful models, every public checkpoint, the full training recipe."""

from .factory import create_model, list_models, list_pretrained, save_pretrained
from .models import ConvNeXt, ConvNeXtConfig, ConvNeXtIsotropic, ConvNeXtIsotropicConfig
from .models.optimize import optimize_for_inference, optimize_for_training
from .weights import PRETRAINED, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "PRETRAINED", "ConvNeXt", "ConvNeXtConfig", "ConvNeXtIsotropic", "ConvNeXtIsotropicConfig",
    "__version__", "create_model", "list_models", "list_pretrained", "load_checkpoint", "optimize_for_inference",
    "optimize_for_training", "save_checkpoint", "save_pretrained",
]
