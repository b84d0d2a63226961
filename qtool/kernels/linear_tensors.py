"""The tensors of one quantized linear as a backend's prepare takes them, per weight format (GptqLinearTensors,
Exl2LinearTensors), and the input check every matmul of such a linear makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qtool.core.errors import QtoolError


def check_input_features(x: torch.Tensor, in_features: int, linear_label: str) -> None:
    """A QtoolError unless x's last dimension is the layer's in_features; linear_label names the layer."""
    if x.shape[-1] != in_features:
        raise QtoolError(f"input has {x.shape[-1]} features, the {linear_label} expects {in_features}")


@dataclass
class GptqLinearTensors:
    """The GPTQ tensors and settings of one linear, as QuantLinear holds them."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int
    checkpoint_format: str = "gptq"

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @classmethod
    def from_module(cls, module: Any) -> "GptqLinearTensors":
        """Read the buffers and attributes of a QuantLinear (or anything with the same names)."""
        return cls(module.qweight, module.qzeros, module.scales, module.g_idx, getattr(module, "bias", None),
                   module.bits, module.group_size, module.checkpoint_format)


@dataclass
class Exl2LinearTensors:
    """The EXL2 tensors of one linear, as Exl2Linear holds them (q_perm is left out: argsort(q_invperm) is it)."""

    q_weight: torch.Tensor
    q_invperm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    bias: torch.Tensor | None
    out_features: int

    @property
    def in_features(self) -> int:
        return self.q_invperm.shape[0]

    @classmethod
    def from_module(cls, module: Any) -> "Exl2LinearTensors":
        """Read the buffers and out_features of an Exl2Linear (or anything with the same names)."""
        return cls(module.q_weight, module.q_invperm, module.q_scale, module.q_scale_max, module.q_groups,
                   getattr(module, "bias", None), module.out_features)
