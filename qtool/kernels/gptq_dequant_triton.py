"""Dequantize a GPTQ linear straight from the checkpoint's own layout (qweight as stored, the grad form's uint8
zeros, scales, g_idx) into a caller's buffer as W^T [K, N]: no repacked copy of the codes is needed, so a layer
served this way keeps one packed copy of its weight. What the dequant backend (dequant_backend.py) runs before
each cuBLAS matmul of a training step. Beside its torch reference (dequant_ref.dequantize_gptq, transposed)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from qtool.kernels.exl2_triton import _round_to
from qtool.kernels.gptq_grad_input_triton import GptqGradForm

# the dtypes the kernel writes; others go through the reference
DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_K, BLOCK_N, NUM_WARPS = 64, 256, 8  # 16K values per program: memory-bound, enough bytes in flight per SM


def triton_interpreted() -> bool:
    """True when this kernel was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(gptq_checkpoint_dequant_kernel, JITFunction)


@triton.jit
def gptq_checkpoint_dequant_kernel(
    qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    N, K, group_size,
    BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr,
):
    """out[k, n] = (code[k, n] - zero[g[k], n]) * scale[g[k], n], rounded once to out's dtype. Program (pid_k,
    pid_n) writes the [BK, BN] tile. 2/4/8 bits: each word is loaded once and split by a broadcast shift (code k
    is at bit (k % (32/BITS)) * BITS of word k / (32/BITS)); 3 bits: every row reads its word, and the next one
    where the code straddles. GROUP_PER_TILE: the tile's rows share one group (g_idx = k // group_size and BK
    divides group_size): one row of scales and zeros. ROUND_BY_HAND: bfloat16 rounding for the interpreter."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    n_ok = offs_n < N
    k_ok = offs_k < K
    if (32 % BITS) == 0:
        VALUES: tl.constexpr = 32 // BITS
        UNITS: tl.constexpr = BK // VALUES
        units = pid_k * UNITS + tl.arange(0, UNITS)
        words = tl.load(qweight_ptr + units[:, None] * N + offs_n[None, :],
                        mask=(units[:, None] * VALUES < K) & n_ok[None, :], other=0)
        shifts = (tl.arange(0, VALUES) * BITS).to(tl.uint32)
        codes3 = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes3, (BK, BN))
    else:
        pos = offs_k * BITS
        word = pos // 32
        off = (pos % 32).to(tl.uint32)
        mask = k_ok[:, None] & n_ok[None, :]
        lo = tl.load(qweight_ptr + word[:, None] * N + offs_n[None, :], mask=mask, other=0)
        spill = mask & (off + BITS > 32)[:, None]
        hi = tl.load(qweight_ptr + (word + 1)[:, None] * N + offs_n[None, :], mask=spill, other=0)
        codes = (lo.to(tl.uint32, bitcast=True) >> off[:, None]) | (hi.to(tl.uint32, bitcast=True) << ((32 - off) & 31)[:, None])
        codes = codes & ((1 << BITS) - 1)
    if GROUP_PER_TILE:
        group = (pid_k * BK) // group_size
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        group = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
        gather = group[:, None] * N + offs_n[None, :]
        w_ok = k_ok[:, None] & n_ok[None, :]
        zero = tl.load(zeros_ptr + gather, mask=w_ok, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + gather, mask=w_ok, other=0.0).to(tl.float32)
    # (code - zero) is a small integer and its product with a 16-bit scale is exact in float32: one rounding
    w = (codes.to(tl.float32) - zero) * scale
    if ROUND_BY_HAND:
        w = _round_to(w, out_ptr.dtype.element_ty)
    else:
        w = w.to(out_ptr.dtype.element_ty)
    # K * N can pass 2**31 on the largest fused linears
    tl.store(out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], w, mask=k_ok[:, None] & n_ok[None, :])


def dequantize_into(form: GptqGradForm, out: torch.Tensor) -> torch.Tensor:
    """Write W^T [in_features, out_features] of the layer into `out` (contiguous, that shape, float16, bfloat16 or
    float32, on the layer's device) and return it."""
    k, n = form.in_features, form.out_features
    if out.shape != (k, n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{k}, {n}] tensor, got {tuple(out.shape)} with strides {out.stride()}")
    if out.dtype not in DEQUANT_DTYPES:
        raise ValueError(f"dequantize_into writes {', '.join(map(str, DEQUANT_DTYPES))}, not {out.dtype}")
    if k == 0 or n == 0:
        return out
    block_k = BLOCK_K
    group_per_tile = form.group_size > 0 and form.group_size % block_k == 0
    if form.group_size > 0 and not group_per_tile and form.group_size % 32 == 0:
        block_k = 32  # groups of 32 or 96 rows still give one group per tile
        group_per_tile = True
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, BLOCK_N))
    gptq_checkpoint_dequant_kernel[grid](
        form.qweight, form.zeros, form.scales, form.g_idx, out, n, k, max(form.group_size, 1),
        BITS=form.bits, BK=block_k, BN=BLOCK_N, GROUP_PER_TILE=group_per_tile, ROUND_BY_HAND=triton_interpreted(),
        num_warps=NUM_WARPS,
    )
    return out
