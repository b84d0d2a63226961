"""The backward of an EXL2 linear with respect to its input, dX[M, K] = dY[M, N] @ W[N, K], as a transposed
dequant-GEMM over the checkpoint's own q_weight (no dense weight): one launch per run of equal-width storage rows
(exl2_triton.Exl2ComputeLayout, the forward's Triton form), each program owning a [BM, BK] tile of those storage
rows and walking N. Storage row s is input feature perm[s], so the tile is stored to those columns of dX: every
feature belongs to exactly one storage row, so runs write disjoint columns and nothing is accumulated across
launches. Beside its torch reference (grad_input_ref.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.kernels.exl2_triton import Exl2ComputeLayout, _codes, _round_to, dot_accumulate, triton_interpreted
from qtool.kernels.grad_input_launch import GradInputConfig, grad_input_call


@triton.jit
def exl2_grad_input_kernel(
    dy_ptr, qw_ptr, perm_ptr, group_ptr, scales_ptr, dx_ptr,
    M, N, stride_dym, stride_q, stride_dxm, row_start, rows, qrow_start,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_IN_F32: tl.constexpr,
):
    """dx[m, perm[s]] = sum_n dy[m, n] * (code[s, n] - 2**(BITS-1)) * scale[group[s], n] for the run's storage
    rows s, each weight value rounded once to dy's dtype as the reference rounds it."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    j = pid_k * BK + tl.arange(0, BK)
    m_ok = offs_m < M
    k_ok = j < rows
    storage_row = row_start + j
    group = tl.load(group_ptr + storage_row, mask=k_ok, other=0)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        a = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)  # [BM, BN]
        codes = _codes(qw_ptr, j, offs_n, n_ok, k_ok, qrow_start, stride_q, BITS)  # [BK, BN]
        scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        w = _round_to((codes - (1 << (BITS - 1))).to(tl.float32) * scale, dy_ptr.dtype.element_ty)  # [BK, BN]
        acc = dot_accumulate(acc, a, tl.trans(w), DOT_IN_F32)
    feature = tl.load(perm_ptr + storage_row, mask=k_ok, other=0)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + feature[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


def exl2_grad_input(grad_output: torch.Tensor, layout: Exl2ComputeLayout, config: GradInputConfig | None = None) -> torch.Tensor:
    """dX[..., K] = dY[..., N] @ dequant(W) in dY's dtype (float16, bfloat16 or float32), in input-feature order;
    config: the tiles (default: default_grad_config of dY's rows)."""
    call = grad_input_call(grad_output, layout.out_features, layout.in_features, config, "exl2_grad_input")
    if call.rows == 0:
        return call.result()
    config = call.config
    for run in layout.runs:
        exl2_grad_input_kernel[call.grid(run.rows)](
            call.dy, layout.q_weight, layout.perm, layout.row_group, layout.scales, call.dx,
            call.rows, layout.out_features, call.dy.stride(0), layout.q_weight.stride(0), call.dx.stride(0),
            run.row_start, run.rows, run.qrow_start,
            BITS=run.bits, BM=config.block_m, BN=config.block_n, BK=config.block_k,
            DOT_IN_F32=triton_interpreted(), num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return call.result()
