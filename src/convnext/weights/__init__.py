"""Pretrained weights, format conversion, the one safe checkpoint reader and the one header of our files."""

from .convert import FORMATS, TABLES, detect_format, from_ours, infer_config, infer_model_name, to_ours, unwrap
from .header import ModelFile, read_model_file, write_model_file
from .io import CheckpointError, download, read_checkpoint, write_safetensors
from .loading import load_checkpoint, load_state_dict_into, read_state_dict, save_checkpoint
from .pretrained import PRETRAINED, PretrainedWeights

__all__ = [
    "FORMATS", "PRETRAINED", "TABLES", "CheckpointError", "ModelFile", "PretrainedWeights", "detect_format",
    "download", "from_ours", "infer_config", "infer_model_name", "load_checkpoint", "load_state_dict_into",
    "read_checkpoint", "read_model_file", "read_state_dict", "save_checkpoint", "to_ours", "unwrap",
    "write_model_file", "write_safetensors",
]
