"""The backward of a GPTQ linear with respect to its input, dX[M, K] = dY[M, N] @ W[N, K], as a transposed
dequant-GEMM: each program owns a [BM, BK] tile of dX and walks N, unpacking the [BN, BK] weight tile it needs
from the checkpoint's own qweight in registers (no dense weight, no repack). Beside its torch reference
(grad_input_ref.py). Every GPTQ width (2/3/4/8; 3-bit codes straddle words), v1/v2 zeros, act-order g_idx and
group sizes that do not divide the width: the group of each input row is read from g_idx, unless the rows of a
K tile provably share one group (g_idx = k // group_size and BK divides group_size), when the tile reads one row
of scales and zeros."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qtool.formats.gptq import unpack_qzeros
from qtool.kernels.exl2_triton import _round_to, dot_accumulate, triton_interpreted
from qtool.kernels.grad_input_launch import GradInputConfig, grad_input_call
from qtool.kernels.linear_tensors import GptqLinearTensors


@dataclass
class GptqGradForm:
    """What the kernel reads of one layer, built once per layer (buffers unchanged): the packed codes as stored,
    the true zero points unpacked to uint8 (v1's +1 applied once, here, instead of in every tile), the scales as
    stored and g_idx as int32. group_size is the layer's when g_idx is the plain k // group_size, else 0."""

    qweight: torch.Tensor  # int32 [K * bits / 32, N]
    zeros: torch.Tensor  # uint8 [G, N]
    scales: torch.Tensor  # float16/bfloat16/float32 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def prepare_gptq_grad(tensors: GptqLinearTensors) -> GptqGradForm:
    """The layer's grad form (see GptqGradForm)."""
    t = tensors
    zeros = unpack_qzeros(t.qzeros, t.bits, t.out_features, t.checkpoint_format).to(torch.uint8)
    g_idx = t.g_idx.to(torch.int32).contiguous()
    plain = torch.arange(t.in_features, device=g_idx.device, dtype=torch.int32) // t.group_size
    return GptqGradForm(
        qweight=t.qweight.contiguous(), zeros=zeros.contiguous(), scales=t.scales.contiguous(), g_idx=g_idx,
        bits=t.bits, group_size=t.group_size if torch.equal(g_idx, plain) else 0,
    )


@triton.jit
def gptq_grad_input_kernel(
    dy_ptr, qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, dx_ptr,
    M, N, K, group_size, stride_dym, stride_dxm,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr, DOT_IN_F32: tl.constexpr,
):
    """dx[m, k] = sum_n dy[m, n] * (code[k, n] - zero[g[k], n]) * scale[g[k], n], the weight value rounded once
    to dy's dtype as the reference rounds it. Program (pid_m, pid_k) owns one [BM, BK] tile of dx. DOT_IN_F32:
    see dot_accumulate."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    m_ok = offs_m < M
    k_ok = offs_k < K
    # code k of a column sits at bit k*BITS of the column's little-endian stream of words
    pos = offs_k * BITS
    word = pos // 32
    off = (pos % 32).to(tl.uint32)
    if GROUP_PER_TILE:
        tile_group = (pid_k * BK) // group_size
    else:
        group = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        a = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)  # [BM, BN]
        w_ok = n_ok[:, None] & k_ok[None, :]
        lo = tl.load(qweight_ptr + word[None, :] * N + offs_n[:, None], mask=w_ok, other=0)
        codes = lo.to(tl.uint32, bitcast=True) >> off[None, :]
        if (32 % BITS) != 0:
            spill = k_ok & (off + BITS > 32)
            hi = tl.load(qweight_ptr + (word + 1)[None, :] * N + offs_n[:, None],
                         mask=n_ok[:, None] & spill[None, :], other=0)
            codes = codes | (hi.to(tl.uint32, bitcast=True) << ((32 - off) & 31)[None, :])
        codes = (codes & ((1 << BITS) - 1)).to(tl.float32)  # [BN, BK]
        if GROUP_PER_TILE:
            zero = tl.load(zeros_ptr + tile_group * N + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
            scale = tl.load(scales_ptr + tile_group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        else:
            zero = tl.load(zeros_ptr + group[None, :] * N + offs_n[:, None], mask=w_ok, other=0).to(tl.float32)
            scale = tl.load(scales_ptr + group[None, :] * N + offs_n[:, None], mask=w_ok, other=0.0).to(tl.float32)
        # (code - zero) is a small integer and the product with a 16-bit scale is exact in float32: one rounding
        w = _round_to((codes - zero) * scale, dy_ptr.dtype.element_ty)  # [BN, BK]
        acc = dot_accumulate(acc, a, w, DOT_IN_F32)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


def gptq_grad_input(grad_output: torch.Tensor, form: GptqGradForm, config: GradInputConfig | None = None) -> torch.Tensor:
    """dX[..., K] = dY[..., N] @ dequant(W) in dY's dtype (float16, bfloat16 or float32); config: the tiles
    (default: default_grad_config of dY's rows)."""
    call = grad_input_call(grad_output, form.out_features, form.in_features, config, "gptq_grad_input")
    if call.rows == 0:
        return call.result()
    config = call.config
    group_per_tile = form.group_size > 0 and form.group_size % config.block_k == 0
    gptq_grad_input_kernel[call.grid(form.in_features)](
        call.dy, form.qweight, form.zeros, form.scales, form.g_idx, call.dx,
        call.rows, form.out_features, form.in_features, max(form.group_size, 1), call.dy.stride(0), call.dx.stride(0),
        BITS=form.bits, BM=config.block_m, BN=config.block_n, BK=config.block_k,
        GROUP_PER_TILE=group_per_tile, DOT_IN_F32=triton_interpreted(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return call.result()
