"""What the GPTQ and EXL2 tensor checks share: reading single tensors of a checkpoint's files, the float dtypes
of safetensors, and the hint for a corrupt tensor."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qtool.formats.safetensors_header import TensorHeader

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
REEXPORT = "the checkpoint is corrupt: re-export it"


class TensorReader:
    """Single tensors of the checkpoint files whose headers passed, each file opened once (memory-mapped: only
    the tensors asked for are read)."""

    def __init__(self, directory: Path, readable: set[str], stack: ExitStack):
        self.directory, self.readable, self.stack = directory, readable, stack
        self.handles: dict[str, Any] = {}

    def can_read(self, *tensors: TensorHeader) -> bool:
        return all(t.file in self.readable for t in tensors)

    def __call__(self, tensor: TensorHeader) -> torch.Tensor:
        if tensor.file not in self.handles:
            self.handles[tensor.file] = self.stack.enter_context(safe_open(str(self.directory / tensor.file), framework="pt"))
        return self.handles[tensor.file].get_tensor(tensor.name)
