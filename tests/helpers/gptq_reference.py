"""An independent reading of the GPTQ layout for the kernel tests: random codes, scales and zeros packed by a
plain bit-stream packer (Python integers, not qtool's packer), and y = x @ W^T + b in float64 from the codes.
Importable from any test as `gptq_reference` (pyproject's pytest `pythonpath` lists this folder)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows, cols*bits/32]: each row one little-endian bit stream (Python ints)."""
    out = []
    for row in values.tolist():
        stream = sum(int(v) << (bits * j) for j, v in enumerate(row))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(len(row) * bits // 32)]
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return torch.tensor(out, dtype=torch.int32)


@dataclass
class RandomGptqLayer:
    """Codes [N, K], scales [G, N] float16, zeros [G, N] (the real zero points), g_idx [K], bias [N] float16, and
    the packed checkpoint tensors qweight [K*bits/32, N] and qzeros [G, N*bits/32] (v1 stores zero - 1), on the CPU."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor
    qweight: torch.Tensor
    qzeros: torch.Tensor


def random_gptq_codes(n: int, k: int, bits: int, group_size: int, act_order: bool, asym: bool,
                      checkpoint_format: str, seed: int, irregular: bool = False) -> RandomGptqLayer:
    """A random layer; group_size -1 is per-channel; irregular: groups of unequal size, as some quantizers write
    them (the repack pads them)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    if asym:
        zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen)
    else:
        zeros = torch.full((groups, n), 1 << (bits - 1))
    g_idx = torch.zeros(k, dtype=torch.int32) if group_size == -1 else torch.arange(k, dtype=torch.int32) // group_size
    if irregular:
        g_idx = torch.randint(0, groups, (k,), generator=gen, dtype=torch.int32)
        g_idx[:groups] = torch.arange(groups, dtype=torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    bias = (torch.randn(n, generator=gen) * 0.1).half()
    return RandomGptqLayer(codes, scales, zeros, g_idx, bias, pack_stream(codes, bits).T.contiguous(),
                           pack_stream(stored_zeros, bits))


def reference_weight(codes, scales, zeros, g_idx) -> torch.Tensor:
    """W [N, K] float64: s * (q - z) of each code's group."""
    rows = g_idx.long()
    return scales.double()[rows].T * (codes.double() - zeros.double()[rows].T)


def reference(x, codes, scales, zeros, g_idx, bias) -> torch.Tensor:
    """x @ W^T (+ bias) in float64, on the CPU."""
    y = x.double().cpu() @ reference_weight(codes, scales, zeros, g_idx).T
    return y if bias is None else y + bias.double().cpu()


def relative_error(y, ref) -> float:
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()
