"""What loading a float model directory checks around transformers' from_pretrained: before it, that the files
hold no undeclared quantized tensors and that config.json's sizes match the stored shapes (safetensors headers
only); after it, that transformers initialised nothing at random for a tensor the files lack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qtool.checkpoints.config_shapes import config_shape_error
from qtool.checkpoints.expected_tensors import expected_tensor_shapes, meta_model, missing_tensors_error, tied_weight_pairs
from qtool.checkpoints.undeclared_quantization import undeclared_quantization_errors
from qtool.formats.safetensors_header import read_checkpoint_headers


def check_before_loading(directory: Path, trust_remote_code: bool = False) -> None:
    """Raise the error `qtool validate` gives for quantized tensors without a quantization config, or for a
    config.json that contradicts the stored shapes. Files that cannot be read are left to the loader's own error."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    tensors, _, _ = read_checkpoint_headers(directory)
    if not tensors:
        return
    for problem in undeclared_quantization_errors(tensors):
        raise problem
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError, AttributeError, StrictDataclassError):
        return  # from_pretrained gives the error (sources.load_model turns these into one line)
    model = meta_model(config, trust_remote_code)
    if model is None:
        return
    stored = {name: tensor.shape for name, tensor in tensors.items()}
    problem = config_shape_error(config, expected_tensor_shapes(model), stored, {name: tensor.file for name, tensor in tensors.items()})
    if problem is not None:
        raise problem


def check_loading_info(model: nn.Module, loading_info: dict[str, Any]) -> None:
    """Raise when from_pretrained reports a missing key: transformers initialises such a tensor at random and
    only logs it. Tied weights are not missing (transformers shares the other side), nor are non-persistent
    buffers (never in the files)."""
    missing = set(loading_info.get("missing_keys") or ()) - set(tied_weight_pairs(model))
    problem = missing_tensors_error(type(model).__name__, sorted(missing))
    if problem is not None:
        raise problem
