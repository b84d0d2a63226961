"""The torch reference of a quantized linear's backward with respect to its input, dX = dY @ dequant(W): the
whole weight dequantized in `dtype` (default dY's), then one matmul. What the Triton grad-input kernels are
tested against (in float64) and what the backward runs where they do not (CPU, float64)."""

from __future__ import annotations

import torch

from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.exl2_dequant_ref import dequantize_exl2
from qtool.kernels.linear_tensors import Exl2LinearTensors, GptqLinearTensors


def gptq_grad_input_ref(grad_output: torch.Tensor, tensors: GptqLinearTensors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dX[..., K] = dY[..., N] @ W[N, K], W dequantized in `dtype` (default dY's); the result in `dtype`."""
    t = tensors
    dtype = dtype or grad_output.dtype
    weight = dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.checkpoint_format, dtype)
    return torch.matmul(grad_output.to(dtype), weight)


def exl2_grad_input_ref(grad_output: torch.Tensor, tensors: Exl2LinearTensors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dX[..., K] = dY[..., N] @ W[N, K] for an EXL2 layer, W in input-feature order, dequantized in `dtype`."""
    t = tensors
    dtype = dtype or grad_output.dtype
    # the reference dequantizes in float32 (exact products, one rounding); float64 takes those values as they are
    weight = dequantize_exl2(t.q_weight, t.q_invperm, t.q_scale, t.q_scale_max, t.q_groups, t.out_features,
                             torch.float32 if dtype == torch.float64 else dtype).to(dtype)
    return torch.matmul(grad_output.to(dtype), weight)
