"""Triton GEMV for a few input rows (decode, M <= 8): y[M, N] = x[M, K] @ dequant(W)^T on the GPTQ compute layout,
split over K, codes turned into exact floats in registers once per tile and dotted with every row of x on the FMA
units (no tensor cores)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qtool.kernels.gptq_triton_common import (
    DENORMAL_SCALE,
    check_split_workspace,
    code_as_denormal,
    code_as_f32,
    code_rows,
    compute_rows,
    finish_tile,
    kernel_tensors,
    split_k_sizes,
    tile_scale_zero,
    weight_flags,
    x_for_denormal_code,
)
from qtool.kernels.repack import GptqComputeWeight

DENORMAL_BITS = (2, 4, 8)  # widths whose codes never straddle words: the denormal unpacking applies


@triton.jit
def _tile_words(qweight_ptr, t, unit_ids, offs_n, n_ok, N, num_units,
                BITS: tl.constexpr, UNITS: tl.constexpr, EVEN: tl.constexpr):
    """The packed words (w0, w1, w2) of K tile t, as uint32 [UNITS, BLOCK_N] (w1 = w2 = w0 unless 3-bit)."""
    UNIT_WORDS: tl.constexpr = 3 if BITS == 3 else 1
    units = t * UNITS + unit_ids
    w_ptrs = qweight_ptr + (units * UNIT_WORDS)[:, None] * N + offs_n[None, :]
    if EVEN:
        w0 = tl.load(w_ptrs).to(tl.uint32, bitcast=True)
        if BITS == 3:
            w1 = tl.load(w_ptrs + N).to(tl.uint32, bitcast=True)
            w2 = tl.load(w_ptrs + 2 * N).to(tl.uint32, bitcast=True)
    else:
        w_mask = (units < num_units)[:, None] & n_ok[None, :]
        w0 = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        if BITS == 3:
            w1 = tl.load(w_ptrs + N, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
    if BITS != 3:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _tile_part(dot_f, x_sum, scale, zero, DIV: tl.constexpr, DENORMAL: tl.constexpr):
    """A tile's contribution from its code dot products and x sums (see gptq_gemv_kernel); the caller passes
    x_sum, scale and zero already broadcastable against dot_f."""
    if DENORMAL:
        part = (scale * DENORMAL_SCALE) * dot_f - (scale * zero) * x_sum
    else:
        part = (scale * DIV) * dot_f - (scale * (DIV + zero)) * x_sum
    return part


@triton.jit
def _load_x(row_ptr, cols, ok, MASKED: tl.constexpr):
    if MASKED:
        xj = tl.load(row_ptr + cols, mask=ok, other=0.0)
    else:
        xj = tl.load(row_ptr + cols)
    return xj.to(tl.float32)


@triton.jit
def gptq_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, num_units, group_rows, zero_const, tiles_per_split, stride_xm, stride_om,
    BITS: tl.constexpr, UNITS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, FRAGMENT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_UNITS: tl.constexpr, ROW_SUM_EACH_TILE: tl.constexpr, PREFETCH: tl.constexpr,
    DENORMAL: tl.constexpr,
):
    """y = x @ W^T for ROWS = M = 1 or 2 rows of x, each row with its own 2-D accumulators (the code of a weight
    value is unpacked once and multiplied into both rows). Program (pid_n, pid_k) covers BLOCK_N outputs and tiles
    [pid_k*tiles_per_split, ...) of UNITS packing units (a unit: one word of 32/BITS rows, or three words of 32
    rows for 3 bits). Each tile lies inside one group, so with f = 1 + q/2^b the tile contributes
    s*(2^b*sum(x*f) - (2^b + z)*sum(x)). With PREFETCH the next tile's words are loaded before this tile is
    computed (two tiles in flight per program: the loads of a non-dot loop are not pipelined by num_stages).
    With DENORMAL (2/4/8 bits) codes are unpacked as subnormals (gptq_triton_common) and the tile contributes
    s*(2^87*sum(x'*d) - z*sum(x))."""
    UNIT_ROWS: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    TILE_ROWS: tl.constexpr = UNITS * UNIT_ROWS
    DIV: tl.constexpr = 1 << BITS
    EVEN: tl.constexpr = EVEN_N and EVEN_UNITS
    MASKED: tl.constexpr = HAS_PERM or not EVEN_UNITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    unit_ids = tl.arange(0, UNITS)

    if ROW_SUM_EACH_TILE:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((UNITS, BLOCK_N), dtype=tl.float32)
    if ROWS == 2:
        acc1 = tl.zeros_like(acc)
    total_tiles = tl.cdiv(num_units, UNITS)
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, total_tiles)
    if PREFETCH:
        n0, n1, n2 = _tile_words(qweight_ptr, t_begin, unit_ids, offs_n, n_ok, N, num_units, BITS, UNITS, EVEN)
        n_scale, n_zero = tile_scale_zero(scales_ptr, zeros_ptr, (t_begin * TILE_ROWS) // group_rows, offs_n,
                                          n_ok, N, zero_const, HAS_ZEROS)
    for t in range(t_begin, t_end):
        units = t * UNITS + unit_ids
        unit_ok = units < num_units
        if PREFETCH:
            w0, w1, w2, scale, zero = n0, n1, n2, n_scale, n_zero
            t_next = tl.minimum(t + 1, t_end - 1)  # the last tile re-reads itself (in bounds, from cache)
            n0, n1, n2 = _tile_words(qweight_ptr, t_next, unit_ids, offs_n, n_ok, N, num_units, BITS, UNITS, EVEN)
            n_scale, n_zero = tile_scale_zero(scales_ptr, zeros_ptr, (t_next * TILE_ROWS) // group_rows, offs_n,
                                              n_ok, N, zero_const, HAS_ZEROS)
        else:
            w0, w1, w2 = _tile_words(qweight_ptr, t, unit_ids, offs_n, n_ok, N, num_units, BITS, UNITS, EVEN)
            scale, zero = tile_scale_zero(scales_ptr, zeros_ptr, (t * TILE_ROWS) // group_rows, offs_n, n_ok, N,
                                          zero_const, HAS_ZEROS)

        dot_f = tl.zeros((UNITS, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((UNITS,), dtype=tl.float32)
        if ROWS == 2:
            dot_f1 = tl.zeros((UNITS, BLOCK_N), dtype=tl.float32)
            x_sum1 = tl.zeros((UNITS,), dtype=tl.float32)
        unit_row0 = compute_rows(units * UNIT_ROWS, FRAGMENT)
        for j in tl.static_range(UNIT_ROWS):
            rows = code_rows(unit_row0, j, FRAGMENT)
            if HAS_PERM:
                cols = tl.load(perm_ptr + rows, mask=unit_ok, other=-1)
                ok = cols >= 0
            else:
                cols = rows
                ok = unit_ok
            if DENORMAL:
                code = code_as_denormal(w0, j, BITS)
            else:
                code = code_as_f32(w0, w1, w2, j, BITS)
            xj = _load_x(x_ptr, cols, ok, MASKED)
            x_sum += xj
            if DENORMAL:
                xj = x_for_denormal_code(xj, j, BITS)
            dot_f += xj[:, None] * code
            if ROWS == 2:
                xj1 = _load_x(x_ptr + stride_xm, cols, ok, MASKED)
                x_sum1 += xj1
                if DENORMAL:
                    xj1 = x_for_denormal_code(xj1, j, BITS)
                dot_f1 += xj1[:, None] * code
        part = _tile_part(dot_f, x_sum[:, None], scale[None, :], zero[None, :], DIV, DENORMAL)
        if ROW_SUM_EACH_TILE:
            acc += tl.sum(part, axis=0)
        else:
            acc += part
        if ROWS == 2:
            part1 = _tile_part(dot_f1, x_sum1[:, None], scale[None, :], zero[None, :], DIV, DENORMAL)
            if ROW_SUM_EACH_TILE:
                acc1 += tl.sum(part1, axis=0)
            else:
                acc1 += part1

    if not ROW_SUM_EACH_TILE:
        acc = tl.sum(acc, axis=0)
        if ROWS == 2:
            acc1 = tl.sum(acc1, axis=0)
    if ROWS == 2:
        result = tl.trans(tl.join(acc, acc1))  # [2, BLOCK_N]
    else:
        result = tl.expand_dims(acc, 0)
    finish_tile(result, tl.arange(0, ROWS), offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, pid_n,
                SPLIT_K, HAS_BIAS)


@triton.jit
def gptq_gemv_rows_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, num_units, group_rows, zero_const, tiles_per_split, stride_xm, stride_om,
    BITS: tl.constexpr, UNITS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, FRAGMENT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_UNITS: tl.constexpr, ROW_SUM_EACH_TILE: tl.constexpr, DENORMAL: tl.constexpr,
):
    """gptq_gemv_kernel for 2 <= M <= ROWS input rows (3-D tiles [ROWS, UNITS, BLOCK_N]; for one row the 2-D
    kernel compiles to fewer instructions). Program (pid_n, pid_k) covers BLOCK_N outputs of all M rows and tiles [pid_k*tiles_per_split,
    ...) of UNITS packing units (a unit: one word of 32/BITS rows of W^T, or three words of 32 rows for 3 bits).
    Each tile lies inside one group, so with f = 1 + q/2^b the tile contributes s*(2^b*sum(x*f) - (2^b + z)*sum(x)).
    A weight tile is unpacked once and used for every input row."""
    UNIT_ROWS: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    TILE_ROWS: tl.constexpr = UNITS * UNIT_ROWS
    DIV: tl.constexpr = 1 << BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    unit_ids = tl.arange(0, UNITS)
    offs_r = tl.arange(0, ROWS)
    r_ok = offs_r < M

    if ROW_SUM_EACH_TILE:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, UNITS, BLOCK_N), dtype=tl.float32)
    total_tiles = tl.cdiv(num_units, UNITS)
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, total_tiles)
    for t in range(t_begin, t_end):
        units = t * UNITS + unit_ids
        unit_ok = units < num_units
        w0, w1, w2 = _tile_words(qweight_ptr, t, unit_ids, offs_n, n_ok, N, num_units, BITS, UNITS,
                                 EVEN_N and EVEN_UNITS)
        scale, zero = tile_scale_zero(scales_ptr, zeros_ptr, (t * TILE_ROWS) // group_rows, offs_n, n_ok, N,
                                      zero_const, HAS_ZEROS)

        dot_f = tl.zeros((ROWS, UNITS, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((ROWS, UNITS), dtype=tl.float32)
        unit_row0 = compute_rows(units * UNIT_ROWS, FRAGMENT)
        for j in tl.static_range(UNIT_ROWS):
            rows = code_rows(unit_row0, j, FRAGMENT)
            if HAS_PERM:
                src = tl.load(perm_ptr + rows, mask=unit_ok, other=-1)
                xj = tl.load(x_ptr + offs_r[:, None] * stride_xm + src[None, :],
                             mask=r_ok[:, None] & (src >= 0)[None, :], other=0.0).to(tl.float32)
            else:
                xj = tl.load(x_ptr + offs_r[:, None] * stride_xm + rows[None, :],
                             mask=r_ok[:, None] & unit_ok[None, :], other=0.0).to(tl.float32)
            if DENORMAL:
                dot_f += x_for_denormal_code(xj, j, BITS)[:, :, None] * code_as_denormal(w0, j, BITS)[None, :, :]
            else:
                dot_f += xj[:, :, None] * code_as_f32(w0, w1, w2, j, BITS)[None, :, :]
            x_sum += xj
        part = _tile_part(dot_f, x_sum[:, :, None], scale[None, None, :], zero[None, None, :], DIV, DENORMAL)
        if ROW_SUM_EACH_TILE:
            acc += tl.sum(part, axis=1)
        else:
            acc += part

    if ROW_SUM_EACH_TILE:
        result = acc
    else:
        result = tl.sum(acc, axis=1)
    finish_tile(result, offs_r, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, pid_n,
                SPLIT_K, HAS_BIAS)


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of gptq_gemv_kernel. units: packing units per K tile; split_k: programs along K;
    row_sum_each_tile: fold the tile's rows into a [block_n] accumulator every tile, which is cheap when each
    thread holds whole tile columns (block_n = 128 * num_warps)."""

    block_n: int
    units: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 1
    row_sum_each_tile: bool = False
    prefetch: bool = False  # M <= 2 (the 2-D kernel) only: load tile t+1 before computing tile t
    denormal: bool = True  # 2/4/8 bits: unpack codes as subnormals (one AND per code instead of a shift and an and-or)


def unit_rows(bits: int) -> int:
    return 32 if bits == 3 else 32 // bits


def gemv_tile_fits(weight: GptqComputeWeight, units: int) -> bool:
    """True when a K tile of `units` packing units never straddles two groups."""
    return weight.group_rows % (units * unit_rows(weight.bits)) == 0


MAX_GEMV_ROWS = 8  # past this the FMA work per weight grows past what the tl.dot kernels cost
MAX_TWO_D_ROWS = 2  # M up to this runs gptq_gemv_kernel (one 2-D accumulator set per row), above it the 3-D kernel


def gptq_gemv(x: torch.Tensor, weight: GptqComputeWeight, config: GemvConfig, out: torch.Tensor,
              workspace: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias) for M <= MAX_GEMV_ROWS. workspace float32 [>= M*N] and counters int32
    [>= N/block_n] must be zero on entry when split_k > 1; they are zero again on return."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_GEMV_ROWS or x.shape[1] != weight.in_features:
        raise ValueError(f"gptq_gemv expects x of shape [1..{MAX_GEMV_ROWS}, {weight.in_features}], got {tuple(x.shape)}")
    if not gemv_tile_fits(weight, config.units):
        raise ValueError(f"a tile of {config.units} units straddles groups of {weight.group_rows} rows")
    m, n = x.shape[0], weight.out_features
    urows = unit_rows(weight.bits)
    num_units = weight.k_rows // urows
    tiles_per_split, split_k = split_k_sizes(triton.cdiv(num_units, config.units), config.split_k)
    grid_n = triton.cdiv(n, config.block_n)
    check_split_workspace(split_k, workspace, counters, m * n, grid_n)
    if x.stride(1) != 1:
        x = x.contiguous()
    if m <= MAX_TWO_D_ROWS:
        kernel, rows = gptq_gemv_kernel, {"PREFETCH": config.prefetch, "ROWS": m}
    else:
        kernel, rows = gptq_gemv_rows_kernel, {"ROWS": triton.next_power_of_2(m)}
    kernel[(grid_n, split_k)](
        *kernel_tensors(x, weight, out, workspace, counters),
        m, n, num_units, weight.group_rows, weight.zero_const, tiles_per_split, x.stride(0), out.stride(0),
        BITS=weight.bits, UNITS=config.units, BLOCK_N=config.block_n, SPLIT_K=split_k, **rows, **weight_flags(weight),
        EVEN_N=n % config.block_n == 0, EVEN_UNITS=num_units % config.units == 0,
        ROW_SUM_EACH_TILE=config.row_sum_each_tile, DENORMAL=config.denormal and weight.bits in DENORMAL_BITS,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
