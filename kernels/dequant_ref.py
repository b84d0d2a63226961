"""Reference dequantization of a GPTQ linear straight from its packed tensors, in plain torch: the ground truth
every faster kernel is tested against."""

from __future__ import annotations

import torch

from qtool.convert.gptq_format import unpack_qzeros
from qtool.convert.pack import unpack_rows


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
    # code - zero is a small integer, exact in any float dtype, so the product rounds once.
    centered = (codes - zeros.index_select(0, rows)).to(dtype)
    return (centered * scales.to(dtype).index_select(0, rows)).T
