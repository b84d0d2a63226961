"""Triton GEMM on the GPTQ compute layout (M >= 2): tl.dot tiles with the weight tile unpacked in registers,
optionally split over K for skinny M; and a dequantize kernel that writes W^T in the input dtype for the
large-M path through torch.matmul (cuBLAS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from qtool.kernels.gptq_triton_common import (
    check_matmul_input,
    check_split_workspace,
    compute_rows,
    finish_tile,
    kernel_tensors,
    load_x_tile,
    split_k_sizes,
    split_tile_range,
    tile_scale_zero,
    weight_flags,
)
from qtool.kernels.repack import GptqComputeWeight

# How the weight tile is formed: MAGIC keeps exact codes in the tile (1 + q/2^b as a 16-bit float) and applies
# scale and zero to the tl.dot result once per tile, which suits skinny M; DEQUANT scales every weight
# element before tl.dot, which suits large M and is the only exact choice for 8-bit codes with bfloat16.
MODE_MAGIC = 0
MODE_DEQUANT = 1
# How packed words become a [BK, BN] code tile: POINTER loads the word of every row (a word is re-read by the
# rows it packs, from L1); RESHAPE loads each word once and splits it with a broadcast shift and tl.reshape.
UNPACK_POINTER = 0
UNPACK_RESHAPE = 1


def triton_interpreted() -> bool:
    """True when these kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(gptq_gemm_kernel, JITFunction)


@triton.jit
def _load_codes(qweight_ptr, t, offs_n, N, num_rows, BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                UNPACK: tl.constexpr, EVEN: tl.constexpr):
    """uint32 codes [BK, BN] of compute rows t*BK .. t*BK+BK-1 (rows past num_rows read as code 0)."""
    if UNPACK == 1:
        VALUES: tl.constexpr = 32 // BITS
        UNITS: tl.constexpr = BK // VALUES
        units = t * UNITS + tl.arange(0, UNITS)
        ptrs = qweight_ptr + units[:, None] * N + offs_n[None, :]
        if EVEN:
            words = tl.load(ptrs)
        else:
            words = tl.load(ptrs, mask=(units[:, None] * VALUES < num_rows) & (offs_n[None, :] < N), other=0)
        words = words.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, VALUES) * BITS).to(tl.uint32)
        codes3 = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes3, (BK, BN))
    else:
        rows = t * BK + tl.arange(0, BK)
        mask = (rows[:, None] < num_rows) & (offs_n[None, :] < N)
        if BITS == 3:
            pos = (rows % 32) * 3
            word = (rows // 32) * 3 + pos // 32
            off = (pos % 32).to(tl.uint32)
            lo = tl.load(qweight_ptr + word[:, None] * N + offs_n[None, :], mask=mask, other=0)
            spill = mask & (off[:, None] > 29)
            hi = tl.load(qweight_ptr + (word + 1)[:, None] * N + offs_n[None, :], mask=spill, other=0)
            lo = lo.to(tl.uint32, bitcast=True)
            hi = hi.to(tl.uint32, bitcast=True)
            codes = ((lo >> off[:, None]) | (hi << ((32 - off) & 31)[:, None])) & 7
        else:
            VALUES2: tl.constexpr = 32 // BITS
            ptrs = qweight_ptr + (rows // VALUES2)[:, None] * N + offs_n[None, :]
            if EVEN:
                words = tl.load(ptrs)
            else:
                words = tl.load(ptrs, mask=mask, other=0)
            off = ((rows % VALUES2) * BITS).to(tl.uint32)
            codes = (words.to(tl.uint32, bitcast=True) >> off[:, None]) & ((1 << BITS) - 1)
    return codes


@triton.jit
def gptq_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K_X, num_rows, group_rows, zero_const, tiles_per_split, stride_xm, stride_om,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, MODE: tl.constexpr, UNPACK: tl.constexpr, IS_BF16: tl.constexpr,
    DOT_IN_F32: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    FRAGMENT: tl.constexpr, EVEN: tl.constexpr,
):
    """Program (tile, pid_k): output tile [BM, BN] over K tiles [pid_k*tiles_per_split, ...) of BK rows, each
    inside one group. MODE_MAGIC: acc += s*2^b*dot(x, f) - s*(2^b + z)*rowsum(x) with f = 1 + q/2^b exact in
    16 bits. MODE_DEQUANT: acc += dot(x, s*(q - z)). DOT_IN_F32 is for the interpreter only, whose tl.dot
    multiplies the raw bits of bfloat16 operands (Triton 3.9)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    # grouped ordering: GROUP_M row tiles share each column tile while it sits in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    DIV: tl.constexpr = 1 << BITS
    acc = tl.zeros((BM, BN), dtype=tl.float32)

    t_begin, t_end = split_tile_range(num_rows, pid_k, tiles_per_split, BK)
    for t in range(t_begin, t_end):
        # tile row i is packed position t*BK + i; in fragment order x is gathered in that order instead
        rows = compute_rows(t * BK + offs_k, FRAGMENT)
        a = load_x_tile(x_ptr, perm_ptr, rows, offs_m, m_ok, stride_xm, num_rows, K_X, HAS_PERM, False)
        codes = _load_codes(qweight_ptr, t, offs_n, N, num_rows, BITS, BK, BN, UNPACK, EVEN)

        scale, zero = tile_scale_zero(scales_ptr, zeros_ptr, (t * BK) // group_rows, offs_n, n_ok, N,
                                      zero_const, HAS_ZEROS)

        if MODE == 0:
            if IS_BF16:
                f16 = (codes << (7 - BITS)) | 0x3F80
                b = f16.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                f16 = (codes << (10 - BITS)) | 0x3C00
                b = f16.to(tl.uint16).to(tl.float16, bitcast=True)
            if DOT_IN_F32:
                part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, b)
            a_sum = tl.sum(a.to(tl.float32), axis=1)
            acc += (scale * DIV)[None, :] * part - a_sum[:, None] * (scale * (DIV + zero))[None, :]
        else:
            f32 = ((codes << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
            w = f32 * (scale * DIV)[None, :] - (scale * (DIV + zero))[None, :]
            w = w.to(x_ptr.dtype.element_ty)
            if DOT_IN_F32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)

    tile_id = pid_m * grid_n + pid_n
    finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id,
                SPLIT_K, HAS_BIAS)


@triton.jit
def gptq_dequant_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, out_ptr,
    N, K_X, num_rows, group_rows, zero_const,
    BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, UNPACK: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, FRAGMENT: tl.constexpr,
):
    """out[k, n] = W[n, k] for input column k (W^T, [K, N], row k of the compute layout written to row perm[k]).
    BK divides group_rows, so the tile's rows share one group: one scale and zero vector per tile."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    codes = _load_codes(qweight_ptr, t, offs_n, N, num_rows, BITS, BK, BN, UNPACK, False)
    rows = compute_rows(t * BK + tl.arange(0, BK), FRAGMENT)
    scale, zero = tile_scale_zero(scales_ptr, zeros_ptr, (t * BK) // group_rows, offs_n, n_ok, N,
                                  zero_const, HAS_ZEROS)
    w = (codes.to(tl.float32) - zero[None, :]) * scale[None, :]
    if HAS_PERM:
        dest = tl.load(perm_ptr + rows, mask=rows < num_rows, other=-1)
    else:
        dest = rows
    keep = (rows[:, None] < num_rows) & n_ok[None, :] & (dest[:, None] >= 0) & (dest[:, None] < K_X)
    # K*N can pass 2**31 for the largest linears
    tl.store(out_ptr + dest.to(tl.int64)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=keep)


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of gptq_gemm_kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    mode: int = MODE_MAGIC
    unpack: int = UNPACK_POINTER
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2


def gemm_config_valid(weight: GptqComputeWeight, config: GemmConfig, dtype: torch.dtype) -> bool:
    """Whether the kernel can run this config on this weight: K tiles inside groups, packing-aligned tiles,
    and an exact code tile for MODE_MAGIC."""
    bits = weight.bits
    if weight.group_rows % config.block_k or config.block_k < 16:
        return False
    if config.unpack == UNPACK_RESHAPE and (bits == 3 or config.block_k % (32 // bits)):
        return False
    if config.mode == MODE_MAGIC and dtype == torch.bfloat16 and bits > 7:
        return False
    return dtype in (torch.float16, torch.bfloat16)


def gptq_gemm(x: torch.Tensor, weight: GptqComputeWeight, config: GemmConfig, out: torch.Tensor,
              workspace: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias) with tl.dot. With split_k > 1, workspace float32 [>= M*N] and counters
    int32 [>= tiles] must be zero on entry; they are zero again on return."""
    check_matmul_input(x, weight, "gptq_gemm")
    if not gemm_config_valid(weight, config, x.dtype):
        raise ValueError(f"config {config} cannot run on this {weight.bits}-bit layer with {x.dtype} input")
    m, n = x.shape[0], weight.out_features
    tiles_per_split, split_k = split_k_sizes(triton.cdiv(weight.k_rows, config.block_k), config.split_k)
    grid_m, grid_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    check_split_workspace(split_k, workspace, counters, m * n, grid_m * grid_n)
    even = n % config.block_n == 0 and weight.k_rows % config.block_k == 0
    gptq_gemm_kernel[(grid_m * grid_n, split_k)](
        *kernel_tensors(x, weight, out, workspace, counters),
        m, n, weight.in_features, weight.k_rows, weight.group_rows, weight.zero_const, tiles_per_split,
        x.stride(0), out.stride(0),
        BITS=weight.bits, BM=config.block_m, BN=config.block_n, BK=config.block_k, GROUP_M=config.group_m,
        SPLIT_K=split_k, MODE=config.mode, UNPACK=config.unpack, IS_BF16=x.dtype == torch.bfloat16,
        DOT_IN_F32=x.dtype == torch.bfloat16 and triton_interpreted(), **weight_flags(weight),
        EVEN=even, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def gptq_dequantize(weight: GptqComputeWeight, dtype: torch.dtype, block_k: int = 64, block_n: int = 256,
                    num_warps: int = 8) -> torch.Tensor:
    """W^T [K, N] in `dtype`, in the original input order."""
    n = weight.out_features
    while weight.group_rows % block_k:  # group_rows is a multiple of 32 (repack.GROUP_ROW_ALIGN)
        block_k //= 2
    unpack = UNPACK_RESHAPE if weight.bits != 3 and block_k % (32 // weight.bits) == 0 else UNPACK_POINTER
    # every input column is the image of exactly one compute row, so every row of out is written
    out = torch.empty((weight.in_features, n), dtype=dtype, device=weight.qweight.device)
    grid = (triton.cdiv(weight.k_rows, block_k), triton.cdiv(n, block_n))
    gptq_dequant_kernel[grid](
        weight.qweight, weight.scales,
        weight.zeros if weight.zeros is not None else weight.scales,
        weight.perm if weight.perm is not None else weight.qweight,
        out, n, weight.in_features, weight.k_rows, weight.group_rows, weight.zero_const,
        BITS=weight.bits, BK=block_k, BN=block_n, UNPACK=unpack,
        HAS_PERM=weight.perm is not None, HAS_ZEROS=weight.zeros is not None, FRAGMENT=weight.fragment_order,
        num_warps=num_warps,
    )
    return out


def gptq_matmul_dequant(x: torch.Tensor, weight: GptqComputeWeight) -> torch.Tensor:
    """y = x @ W^T (+ bias) by dequantizing W^T to x's dtype and calling torch.matmul (cuBLAS on CUDA)."""
    w_t = gptq_dequantize(weight, x.dtype)
    if weight.bias is None:
        return torch.matmul(x, w_t)
    return torch.addmm(weight.bias.to(x.dtype), x, w_t)
