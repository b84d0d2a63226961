"""Running one decoder layer again and again while its linears are quantized group by group, computing each
quantized linear only once: outputs computed in one pass are recorded and replayed in the later passes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class StopLayerForward(Exception):
    """Raised from a hook once a pass has seen what it needs; the rest of the layer is skipped."""


class RecordingLinear(nn.Module):
    """Computes the wrapped linear and records each output (in call order) for later replay."""

    def __init__(self, linear: nn.Module, store_device: torch.device):
        super().__init__()
        self.linear = linear
        self.store_device = store_device
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.outputs.append(y.to(self.store_device))
        return y


class ReplayLinear(nn.Module):
    """Returns the recorded outputs of a linear in the order they were recorded, without computing anything."""

    def __init__(self, outputs: list[torch.Tensor], out_features: int):
        super().__init__()
        self.outputs = outputs
        self.out_features = out_features
        self.position = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position >= len(self.outputs):
            raise RuntimeError("replay ran past the recorded outputs: the layer's call order changed between passes")
        y = self.outputs[self.position]
        self.position += 1
        if y.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"replayed output {tuple(y.shape)} does not fit input {tuple(x.shape)}")
        return y.to(device=x.device, dtype=x.dtype)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


@contextmanager
def swapped_modules(root: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put `replacements` in place of the named submodules for the duration of the block, then restore them."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent, child = _parent(root, name)
            originals[name] = getattr(parent, child)
            setattr(parent, child, module)
        yield
    finally:
        for name, module in originals.items():
            parent, child = _parent(root, name)
            setattr(parent, child, module)
