"""Reference dequantization of a GPTQ linear straight from its packed tensors, in plain torch: the ground truth
every faster kernel is tested against."""

from __future__ import annotations

import torch

from qtool.formats.gptq import unpack_qzeros
from qtool.formats.bitpack import unpack_rows
from qtool.kernels.profiled_range import DEQUANTIZE_RANGE, profiled_range


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
    with profiled_range(DEQUANTIZE_RANGE):
        return _dequantize_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype)


def _dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                     checkpoint_format: str, dtype: torch.dtype | None) -> torch.Tensor:
    dtype = dtype or scales.dtype
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    codes = unpack_rows(qweight, bits, in_features)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, out_features, checkpoint_format)  # [G, N]
    # code - zero is a small integer, exact in any float dtype; the product must round once, to `dtype`. A scale
    # that `dtype` cannot hold exactly (float16 scales, bfloat16 weights) would round first, so such products
    # are formed in float32, where they are exact (8-bit integer times 11-bit mantissa), and rounded after.
    exact = dtype in (scales.dtype, torch.float32, torch.float64)
    compute = dtype if exact else torch.float32
    # finding the runs reads g_idx on the host: on a GPU that is a sync per call, so there the gather path stays
    group_size = contiguous_group_size(g_idx, zeros.shape[0]) if g_idx.device.type == "cpu" else 0
    if not group_size:  # act-order without static groups: each row's group is its own
        rows = g_idx.long()
        centered = (codes - zeros.index_select(0, rows)).to(compute)
        return (centered * scales.to(compute).index_select(0, rows)).to(dtype).T
    # groups of consecutive rows (the last may be short): each group's zero and scale broadcast over its rows
    # rather than gathered into two [K, N] tensors first; the same elementwise operations, the same values
    scales = scales.to(compute)
    weight = torch.empty(in_features, out_features, dtype=compute, device=codes.device)
    whole = in_features // group_size
    full_rows = whole * group_size
    if whole:
        grouped = (codes[:full_rows].view(whole, group_size, out_features) - zeros[:whole, None, :]).to(compute)
        torch.mul(grouped, scales[:whole, None, :], out=weight[:full_rows].view(whole, group_size, out_features))
    if full_rows < in_features:
        torch.mul((codes[full_rows:] - zeros[whole]).to(compute), scales[whole], out=weight[full_rows:])
    return weight.to(dtype).T


def contiguous_group_size(g_idx: torch.Tensor, groups: int) -> int:
    """The rows per group when g_idx puts the rows into `groups` runs of consecutive rows, in order and all of
    one size but the last, which may be shorter (no act-order, or act-order with static groups); else 0."""
    in_features = g_idx.shape[0]
    if in_features == 0 or groups < 1:
        return 0
    size = int((g_idx == g_idx[0]).sum()) if int(g_idx[0]) == 0 else 0
    if size == 0 or -(-in_features // size) != groups:
        return 0
    expected = torch.arange(in_features, device=g_idx.device) // size
    return size if torch.equal(g_idx.long(), expected) else 0
