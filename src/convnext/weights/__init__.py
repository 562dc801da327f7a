"""Pretrained weights, format conversion, and the one safe checkpoint loader."""

from .convert import FORMATS, TABLES, detect_format, from_ours, infer_config, to_ours, unwrap
from .io import CheckpointError, download, read_checkpoint, write_safetensors
from .loading import (FORMAT_TAG, checkpoint_config, load_checkpoint, load_state_dict_into, read_state_dict,
                      save_checkpoint)
from .pretrained import PRETRAINED, PretrainedWeights

__all__ = [
    "FORMATS", "FORMAT_TAG", "PRETRAINED", "TABLES", "CheckpointError", "PretrainedWeights", "checkpoint_config",
    "detect_format", "download", "from_ours", "infer_config", "load_checkpoint", "load_state_dict_into",
    "read_checkpoint", "read_state_dict", "save_checkpoint", "to_ours", "unwrap", "write_safetensors",
]
