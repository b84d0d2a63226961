"""Reference dequantization of an EXL2 linear straight from its packed tensors, in plain torch: the ground truth
the Triton EXL2 kernel is tested against (the tensors are assumed checked, as the loader does once)."""

from __future__ import annotations

import torch

from qtool.formats.bitpack import WORD_BITS, unpack_bitstream_rows
from qtool.formats.exl2 import exl2_scales, unpack_qscale


def group_rows(q_groups: torch.Tensor, q_weight_rows: int) -> list[tuple[int, int, int]]:
    """(bits, first packed row, rows) of each group."""
    pairs = q_groups.to(torch.int64).reshape(-1, 2).tolist()
    starts = [r for _, r in pairs] + [q_weight_rows]
    return [(b, starts[g], (starts[g + 1] - starts[g]) * WORD_BITS // b) for g, (b, _) in enumerate(pairs)]


def dequantize_exl2(
    q_weight: torch.Tensor,
    q_invperm: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    out_features: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The weight [out_features, in_features] in input-feature order: row k of storage is input q_perm[k] =
    argsort(q_invperm)[k], value (q - 2**(bits-1)) * scale. Exact products in float32, one rounding otherwise."""
    out_features = q_weight.shape[1] if out_features is None else out_features
    scales = exl2_scales(unpack_qscale(q_scale)[:, :out_features], q_scale_max).to(torch.float32)
    parts = []
    for g, (bits, q_row, rows) in enumerate(group_rows(q_groups, q_weight.shape[0])):
        codes = unpack_bitstream_rows(q_weight[q_row : q_row + rows * bits // WORD_BITS, :out_features], bits, rows)
        parts.append((codes - (1 << (bits - 1))).to(torch.float32) * scales[g])
    stored = torch.cat(parts).to(dtype)  # [K, N] in storage order
    # Row i of the weight's transpose is storage row q_invperm[i]. Contiguous [N, K], as nn.Linear holds its
    # weight: matmul kernels pick their reduction order by layout, and the same layout gives the same bits.
    return stored.index_select(0, q_invperm.to(device=stored.device, dtype=torch.int64)).T.contiguous()
