"""The torch reference matmul backends of quantized linears, one per weight format (registry name "torch"): the
whole weight dequantized in x's dtype on every call, then nn.functional.linear; any device, no Triton."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.exl2_dequant_ref import dequantize_exl2
from qtool.kernels.linear_tensors import Exl2LinearTensors, GptqLinearTensors, check_input_features


class GptqTorchBackend:
    """GPTQ's reference: dequantize the whole weight in x's dtype on every call, then nn.functional.linear."""

    name = "torch"

    def supports(self, device: torch.device | str, bits: int, group_size: int, m: int = 1) -> str | None:
        return None

    def prepare(self, tensors: GptqLinearTensors) -> GptqLinearTensors:
        return tensors

    def matmul(self, x: torch.Tensor, packed_layer: GptqLinearTensors) -> torch.Tensor:
        t = packed_layer
        weight = dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.checkpoint_format, x.dtype)
        bias = None if t.bias is None else t.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)


class Exl2TorchBackend:
    """EXL2's reference: dequantize the whole weight in x's dtype on every call, then nn.functional.linear."""

    name = "torch"

    def supports(self, device: torch.device | str, bits: Any, group_size: Any, m: int = 1) -> str | None:
        return None

    def prepare(self, tensors: Exl2LinearTensors) -> Exl2LinearTensors:
        return tensors

    def matmul(self, x: torch.Tensor, packed_layer: Exl2LinearTensors) -> torch.Tensor:
        t = packed_layer
        check_input_features(x, t.in_features, "EXL2 linear")
        weight = dequantize_exl2(t.q_weight, t.q_invperm, t.q_scale, t.q_scale_max, t.q_groups, t.out_features, x.dtype)
        bias = None if t.bias is None else t.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)
