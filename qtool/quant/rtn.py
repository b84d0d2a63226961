"""Round-to-nearest quantization of one linear: each group's grid fitted on the weight as it is, each weight
rounded to it, no error feedback. The baseline GPTQ must beat, and the method that needs no calibration."""

from __future__ import annotations

import time

import torch

from qtool.quant.gptq import GPTQResult
from qtool.quant.grid import check_grid_options, dequantize_codes, fit_group_grids, natural_g_idx, quantize_codes
from qtool.formats.quantized_weight import QuantizedWeight


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True, mse: bool = False, min_zero: int = 0
) -> GPTQResult:
    """Round weight [N, K] to the grid of its groups of consecutive columns (group_size -1: one per row).
    The result's error is the sum of squared weight errors; its damp_percent is 0."""
    started = time.perf_counter()
    check_grid_options(weight, bits, group_size, min_zero)
    w = weight.detach().to(torch.float32)
    scales, zeros = fit_group_grids(w, group_size, bits, sym, mse=mse, min_zero=min_zero)
    g_idx = natural_g_idx(w.shape[1], group_size, w.device)
    column_scales = scales[g_idx.long()].T
    column_zeros = zeros[g_idx.long()].T
    codes = quantize_codes(w, column_scales, column_zeros, bits)
    dequantized = dequantize_codes(codes, column_scales, column_zeros)
    error = float((w - dequantized).square().sum())
    quantized = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size)
    return GPTQResult(quantized, dequantized, error, 0.0, time.perf_counter() - started)
