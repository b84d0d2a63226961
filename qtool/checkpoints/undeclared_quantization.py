"""A directory whose tensors are quantized (GPTQ qweight, EXL2 q_weight) but whose config declares no
quantization: loaded as a float model, every quantized linear would be randomly initialised."""

from __future__ import annotations

from typing import Iterable

from qtool.core.errors import QtoolError

# (format, the tensor suffix every quantized linear of it has, how to fix the config)
QUANTIZED_MARKERS = (
    ("GPTQ", ".qweight", "add the quantization_config the checkpoint was written with"),
    ("EXL2", ".q_weight", 'add the quantization_config the checkpoint was written with ("quant_method": "exl2", bits, head_bits, version)'),
)


def undeclared_quantization_errors(tensor_names: Iterable[str]) -> list[QtoolError]:
    """One error per quantized format whose tensors the files hold, for a directory without quantization config."""
    names = list(tensor_names)
    errors = []
    for format_name, suffix, fix in QUANTIZED_MARKERS:
        layers = sorted(name.removesuffix(suffix) for name in names if name.endswith(suffix))
        if layers:
            errors.append(QtoolError(f"config.json: has no quantization_config but {len(layers)} layers hold {format_name} tensors (first: {layers[0]})", fix))
    return errors
