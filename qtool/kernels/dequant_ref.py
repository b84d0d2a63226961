"""Reference dequantization of a GPTQ linear straight from its packed tensors, in plain torch: the ground truth
every faster kernel is tested against."""

from __future__ import annotations

import torch

from qtool.formats.gptq import unpack_qzeros
from qtool.formats.bitpack import unpack_rows


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The float weight [out_features, in_features] = scales[g] * (code - zero[g]) per input row, g = g_idx[row];
    computed in `dtype` (default: the dtype of scales)."""
    dtype = dtype or scales.dtype
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    codes = unpack_rows(qweight, bits, in_features)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, out_features, checkpoint_format)  # [G, N]
    rows = g_idx.long()
    # code - zero is a small integer, exact in any float dtype; the product must round once, to `dtype`. A scale
    # that `dtype` cannot hold exactly (float16 scales, bfloat16 weights) would round first, so such products
    # are formed in float32, where they are exact (8-bit integer times 11-bit mantissa), and rounded after.
    exact = dtype in (scales.dtype, torch.float32, torch.float64)
    compute = dtype if exact else torch.float32
    centered = (codes - zeros.index_select(0, rows)).to(compute)
    return (centered * scales.to(compute).index_select(0, rows)).to(dtype).T
