"""Triton kernels for EXL2 linears, beside their torch reference (exl2_dequant_ref.py): a fused matmul that
unpacks mixed-width rows in registers (one launch per bit width), and a dequantize kernel for the large-M path
through torch.matmul. Both read the checkpoint's own q_weight; the one-time preparation only gathers the row
permutation, each row's group and the float16 scales.

Groups of one width are consecutive (ExLlamaV2 sorts them widest first) and each starts on a word boundary, so
all rows of one width form a single bit stream: row j of the run sits at bit j*bits of its column's words."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from qtool.formats.exl2 import exl2_scales, unpack_qscale
from qtool.kernels.exl2_dequant_ref import group_rows

FUSED_MAX_M = 128  # above this, dequantize once and let cuBLAS multiply (untuned: no GPU measurement yet)


def triton_interpreted() -> bool:
    """True when these kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(exl2_matmul_kernel, JITFunction)


@dataclass
class Exl2Run:
    """The storage rows [row_start, row_start + rows) of one bit width, from packed row qrow_start."""

    bits: int
    row_start: int
    rows: int
    qrow_start: int


@dataclass
class Exl2ComputeLayout:
    q_weight: torch.Tensor  # int32 [packed rows, columns], as stored
    perm: torch.Tensor  # int32 [K]: the input feature of each storage row
    row_group: torch.Tensor  # int32 [K]: the group of each storage row
    scales: torch.Tensor  # float32 [G, N]: the float16 scales, exactly
    runs: list[Exl2Run]
    out_features: int
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return self.perm.shape[0]


def prepare_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups, out_features: int, bias=None) -> Exl2ComputeLayout:
    """The layer's compute form (once, at load)."""
    device = q_weight.device
    groups = group_rows(q_groups, q_weight.shape[0])
    sizes = torch.tensor([rows for _, _, rows in groups], device=device)
    row_group = torch.repeat_interleave(torch.arange(len(groups), device=device), sizes).to(torch.int32)
    runs: list[Exl2Run] = []
    row = 0
    for bits, q_row, rows in groups:
        if runs and runs[-1].bits == bits:
            runs[-1].rows += rows
        else:
            runs.append(Exl2Run(bits, row, rows, q_row))
        row += rows
    scales = exl2_scales(unpack_qscale(q_scale)[:, :out_features], q_scale_max).to(torch.float32).contiguous()
    return Exl2ComputeLayout(
        q_weight=q_weight.contiguous(),
        perm=torch.argsort(q_invperm.to(torch.int64)).to(torch.int32),
        row_group=row_group,
        scales=scales,
        runs=runs,
        out_features=out_features,
        bias=bias,
    )


@triton.jit
def _codes(qw_ptr, j, offs_n, n_ok, k_ok, qrow_start, stride_q, BITS: tl.constexpr):
    """Codes [BK, BN] of run rows j: bit j*BITS of each column's stream, spilling into the next word for
    3-, 5- and 6-bit values."""
    pos = j * BITS
    word = qrow_start + pos // 32
    off = (pos % 32).to(tl.uint32)
    mask = k_ok[:, None] & n_ok[None, :]
    lo = tl.load(qw_ptr + word[:, None] * stride_q + offs_n[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = lo >> off[:, None]
    if (32 % BITS) != 0:
        spill = k_ok & (off + BITS > 32)
        hi = tl.load(qw_ptr + (word + 1)[:, None] * stride_q + offs_n[None, :], mask=spill[:, None] & n_ok[None, :], other=0)
        codes = codes | (hi.to(tl.uint32, bitcast=True) << ((32 - off) & 31)[:, None])
    return (codes & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _round_to(w, dtype: tl.constexpr):
    """float32 -> dtype, rounding to nearest even. bfloat16 is rounded by hand: the interpreter (Triton 3.9)
    truncates float32 -> bfloat16; on a GPU this gives the same bits as the hardware conversion."""
    if dtype == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float32:
        return w
    else:
        return w.to(dtype)


@triton.jit
def dot_accumulate(acc, a, b, DOT_IN_F32: tl.constexpr):
    """acc + a @ b in float32; float32 operands multiplied exactly (ieee, not tf32). DOT_IN_F32 is for the
    interpreter, whose tl.dot multiplies the raw bits of bfloat16 operands (Triton 3.9): both are widened first."""
    if DOT_IN_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def exl2_matmul_kernel(
    x_ptr, qw_ptr, perm_ptr, group_ptr, scales_ptr, acc_ptr,
    M, N, stride_xm, stride_q, row_start, rows, qrow_start,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_IN_F32: tl.constexpr,
):
    """acc[M, N] (float32) (+)= x[:, perm[run rows]] @ W[run rows] for one run of BITS-bit rows; the weight
    tile is (code - 2**(BITS-1)) * scale rounded once to x's dtype, as the reference rounds it. DOT_IN_F32: see
    dot_accumulate."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, rows, BK):
        j = k0 + tl.arange(0, BK)
        k_ok = j < rows
        storage_row = row_start + j
        feature = tl.load(perm_ptr + storage_row, mask=k_ok, other=0)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + feature[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        codes = _codes(qw_ptr, j, offs_n, n_ok, k_ok, qrow_start, stride_q, BITS)
        group = tl.load(group_ptr + storage_row, mask=k_ok, other=0)
        scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w = _round_to(((codes - (1 << (BITS - 1))).to(tl.float32) * scale), x_ptr.dtype.element_ty)
        acc = dot_accumulate(acc, a, w, DOT_IN_F32)
    out = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)


@triton.jit
def exl2_dequant_kernel(
    qw_ptr, perm_ptr, group_ptr, scales_ptr, out_ptr,
    N, stride_q, row_start, rows, qrow_start,
    BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    """W^T[perm[row], n] = (code - 2**(BITS-1)) * scale in out's dtype, for one run of BITS-bit rows."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = pid_k * BK + tl.arange(0, BK)
    offs_n = pid_n * BN + tl.arange(0, BN)
    k_ok = j < rows
    n_ok = offs_n < N
    storage_row = row_start + j
    codes = _codes(qw_ptr, j, offs_n, n_ok, k_ok, qrow_start, stride_q, BITS)
    group = tl.load(group_ptr + storage_row, mask=k_ok, other=0)
    scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    w = _round_to(((codes - (1 << (BITS - 1))).to(tl.float32) * scale), out_ptr.dtype.element_ty)
    feature = tl.load(perm_ptr + storage_row, mask=k_ok, other=0)
    tl.store(out_ptr + feature[:, None] * N + offs_n[None, :], w, mask=k_ok[:, None] & n_ok[None, :])


def exl2_matmul(x: torch.Tensor, layout: Exl2ComputeLayout, block_m: int = 16, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ bias) in x's dtype, fused (one launch per bit width)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, n = x2.shape[0], layout.out_features
    acc = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    for index, run in enumerate(layout.runs):
        exl2_matmul_kernel[grid](
            x2, layout.q_weight, layout.perm, layout.row_group, layout.scales, acc,
            m, n, x2.stride(0), layout.q_weight.stride(0), run.row_start, run.rows, run.qrow_start,
            BITS=run.bits, BM=block_m, BN=block_n, BK=block_k, ACCUMULATE=index > 0, DOT_IN_F32=triton_interpreted(),
        )
    if layout.bias is not None:
        acc += layout.bias.to(torch.float32)
    return acc.to(x.dtype).reshape(*shape[:-1], n)


def exl2_dequantize(layout: Exl2ComputeLayout, dtype: torch.dtype, block_k: int = 32, block_n: int = 64) -> torch.Tensor:
    """W^T [K, N] in input-feature order, each value the reference's rounded once to dtype."""
    n = layout.out_features
    out = torch.empty(layout.in_features, n, dtype=dtype, device=layout.q_weight.device)
    for run in layout.runs:
        grid = (triton.cdiv(run.rows, block_k), triton.cdiv(n, block_n))
        exl2_dequant_kernel[grid](
            layout.q_weight, layout.perm, layout.row_group, layout.scales, out,
            n, layout.q_weight.stride(0), run.row_start, run.rows, run.qrow_start,
            BITS=run.bits, BK=block_k, BN=block_n,
        )
    return out


def exl2_linear_triton(x: torch.Tensor, layout: Exl2ComputeLayout) -> torch.Tensor:
    """The fused kernel for small M; for large M the dequantized weight through torch.matmul."""
    m = x.numel() // x.shape[-1]
    if m <= FUSED_MAX_M:
        return exl2_matmul(x, layout)
    y = torch.matmul(x, exl2_dequantize(layout, x.dtype))
    return y if layout.bias is None else y + layout.bias.to(x.dtype)

