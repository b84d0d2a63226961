"""Triton GEMM with the weight as the left tl.dot operand: out^T[N, M] = W[N, K] @ x^T[K, M] on the GPTQ compute
layout, for 2-, 4- and 8-bit codes. On Hopper the left operand of wgmma may come from registers, and its N side
(here the tokens) may be as small as the tile allows, so skinny M runs on the tensor cores with the weight tile
dequantized in registers; the right operand (x) is the small one.

Three ways to form the weight tile:
- PAIRS: the codes at positions j and j + V/2 of a packed word (V codes per word) sit in the two 16-bit halves
  of the word once shifted, so one shift and one and-or per two codes yield two exact 16-bit floats BASE + q
  (BASE = 128 for bfloat16, 1024 for float16, q at the bottom of the mantissa). The tile's columns are therefore
  in pair order; x is read contiguously and permuted to that order in registers. The dot of exact codes is
  scaled once per K tile: acc += s * (dot(BASE + q, x) - (BASE + z) * sum(x)).
- DEQUANT: codes in natural order become float32 1 + q/2^b by bit placement, one FMA gives s*(q - z), rounded
  once to the input dtype; tl.dot accumulates over K without a per-tile epilogue. Twice the instructions of
  PAIRS, yet faster at every M measured: PAIRS waits for each tile's MMA before its epilogue
  (bench/kernels_notes.md).
- DENORMAL (bfloat16): a code masked in place is the float32 subnormal q * 2^(offset - 149); one FMA with the
  row's factor s * 2^(109 - offset) gives s*(q - z) * 2^-40 with DEQUANT's single rounding (one AND per code
  instead of a shift and an and-or); the accumulator is scaled back by 2^40 once.
- PACKED (4-bit in fragment order, float16 or bfloat16): the word shifted right by 4j, and-ored with BASE in both
  halves, is the 32-bit register of two exact 16-bit floats BASE + q for the adjacent rows one A-fragment register
  holds (repack.fragment_rows); one paired 16-bit FMA subtracts BASE + z, exactly. Three instructions per two
  codes (shift, and-or, FMA) instead of DENORMAL's five; the scale multiplies each K tile's product once
  (acc += s * dot(q - z, x)), so a tile's MMA must finish before its epilogue: it pays at 16-64 tokens
  (bench/RESULTS.md), not with 128-token tiles, whose epilogue is as large as the unpacking.
The tuner picks per shape. With 4-bit weights stored in fragment order (repack.fragment_rows), DEQUANT, DENORMAL
and PACKED tiles reach wgmma's register layout by a permutation of dimensions inside each thread (_in_row_order,
_packed_tile) instead of a round trip through shared memory; PAIRS then reads x in packed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qtool.kernels.gptq_gemm_triton import triton_interpreted
from qtool.kernels.gptq_triton_common import (
    check_matmul_input,
    code_as_denormal,
    compute_rows,
    finish_tile,
    kernel_tensors,
    load_x_tile,
    split_k_sizes,
    stream_k_sizes,
    split_tile_range,
    tile_scale_zero,
    tile_zero,
    weight_flags,
)
from qtool.kernels.repack import GptqComputeWeight

LEFT_PAIRS = 0
LEFT_DEQUANT = 1
LEFT_DENORMAL = 2
LEFT_PACKED = 3
LEFT_BITS = (2, 4, 8)
# DENORMAL tiles hold s*(q - z) * 2^-LEFT_DENORMAL_EXP: the factor that turns a subnormal code into its value,
# s * 2^(149 - offset), would overflow float32, and bfloat16 (float32's exponent range) holds the scaled values
# with the same rounding; the accumulator is scaled back once
LEFT_DENORMAL_EXP = tl.constexpr(40)


@triton.jit
def _join4(a0, a1, a2, a3):
    """[..., 4] with a0..a3 in order along the new last axis (all four in one thread)."""
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), a0.shape + (4,))


@triton.jit
def _in_order(parts_even, parts_odd):
    """[..., 2n] interleaving two [..., n] tensors: even positions from the first, odd from the second."""
    joined = tl.join(parts_even, parts_odd)
    return tl.reshape(joined, parts_even.shape[:-1] + (parts_even.shape[-1] * 2,))


@triton.jit
def _piece(w, scale, offset, J: tl.constexpr, SHIFT: tl.constexpr, MASK: tl.constexpr, DENORMAL: tl.constexpr):
    """Piece J of the words w [R, U]: (w >> SHIFT*J) & MASK, or with DENORMAL (SHIFT = bits) code J as a float32
    subnormal times scale * 2^(149 - bit offset - LEFT_DENORMAL_EXP), minus offset (scale and offset [R])."""
    if DENORMAL:
        OFF: tl.constexpr = (J * SHIFT) % 32
        if OFF + SHIFT > 23:
            EFF: tl.constexpr = OFF - 12  # code_as_denormal takes these codes from the word shifted right by 12
        else:
            EFF: tl.constexpr = OFF
        MULT: tl.constexpr = 2.0 ** (149 - EFF - LEFT_DENORMAL_EXP)
        out = code_as_denormal(w, J, SHIFT) * (scale * MULT)[:, None] - offset[:, None]
    else:
        out = (w >> SHIFT * J) & MASK
    return out


@triton.jit
def _quad(w, scale, offset, J0: tl.constexpr, STEP: tl.constexpr, SHIFT: tl.constexpr, MASK: tl.constexpr,
          DENORMAL: tl.constexpr):
    """[R, U, 4]: pieces J0, J0 + STEP, J0 + 2 STEP, J0 + 3 STEP of w."""
    return _join4(_piece(w, scale, offset, J0, SHIFT, MASK, DENORMAL),
                  _piece(w, scale, offset, J0 + STEP, SHIFT, MASK, DENORMAL),
                  _piece(w, scale, offset, J0 + 2 * STEP, SHIFT, MASK, DENORMAL),
                  _piece(w, scale, offset, J0 + 3 * STEP, SHIFT, MASK, DENORMAL))


@triton.jit
def _pieces(w, scale, offset, SHIFT: tl.constexpr, MASK: tl.constexpr, COUNT: tl.constexpr, DENORMAL: tl.constexpr):
    """[R, U, COUNT]: _piece j of w for j = 0..COUNT-1 (COUNT in 2, 4, 8, 16)."""
    if COUNT == 2:
        out = tl.join(_piece(w, scale, offset, 0, SHIFT, MASK, DENORMAL),
                      _piece(w, scale, offset, 1, SHIFT, MASK, DENORMAL))
    elif COUNT == 4:
        out = _quad(w, scale, offset, 0, 1, SHIFT, MASK, DENORMAL)
    elif COUNT == 8:
        out = _in_order(_quad(w, scale, offset, 0, 2, SHIFT, MASK, DENORMAL),
                        _quad(w, scale, offset, 1, 2, SHIFT, MASK, DENORMAL))
    else:
        evens = _in_order(_quad(w, scale, offset, 0, 4, SHIFT, MASK, DENORMAL),
                          _quad(w, scale, offset, 2, 4, SHIFT, MASK, DENORMAL))
        odds = _in_order(_quad(w, scale, offset, 1, 4, SHIFT, MASK, DENORMAL),
                         _quad(w, scale, offset, 3, 4, SHIFT, MASK, DENORMAL))
        out = _in_order(evens, odds)
    return out


@triton.jit
def _pair_tile(words, BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """uint32 words [BN, U] -> 16-bit floats BASE + q [BN, U*V] in pair order: column 2j + h of a word holds the
    code at position j + h*V/2."""
    V: tl.constexpr = 32 // BITS
    MASK2: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    if IS_BF16:
        MAGIC2: tl.constexpr = 0x43004300
    else:
        MAGIC2: tl.constexpr = 0x64006400
    pairs = _pieces(words, 0, 0, BITS, MASK2, V // 2, False) | MAGIC2  # [BN, U, V/2], one 16-bit float in each half
    halves = tl.join(pairs.to(tl.uint16), (pairs >> 16).to(tl.uint16))  # [BN, U, V/2, 2]
    if IS_BF16:
        values = halves.to(tl.bfloat16, bitcast=True)
    else:
        values = halves.to(tl.float16, bitcast=True)
    return tl.reshape(values, (words.shape[0], words.shape[1] * V))


@triton.jit
def _natural_tile(words, BITS: tl.constexpr):
    """uint32 words [BN, U] -> float32 1 + q/2^b [BN, U, V], [:, u, i] = code i of word u."""
    V: tl.constexpr = 32 // BITS
    codes = _pieces(words, 0, 0, BITS, (1 << BITS) - 1, V, False)
    return ((codes << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _in_row_order(values, FRAGMENT: tl.constexpr):
    """[BN, U, V] values by word and code -> [BN, U*V] with column k = compute row k of the tile. In fragment order
    (4-bit, 4 words per 32 rows) code j of word 4b + c is row 32b + 8(j % 4) + 2c + j // 4: a permutation of
    dimensions that keeps every value in the thread that unpacked it, and that thread is the one whose wgmma
    A fragment holds the row, so no shared-memory round trip is needed."""
    BN: tl.constexpr = values.shape[0]
    U: tl.constexpr = values.shape[1]
    V: tl.constexpr = values.shape[2]
    if FRAGMENT:
        values = tl.permute(tl.reshape(values, (BN, U // 4, 4, 2, V // 2)), (0, 1, 4, 2, 3))
    return tl.reshape(values, (BN, U * V))


# PACKED's pair of codes (the word shifted right by 4i, $2) -> BASE + q in both 16-bit halves by one and-or, then
# minus BASE + z ($3 in both halves) by one paired FMA, returned as the two halves ($0, $1); BASE = 128 for bfloat16
# (0x4300), 1024 for float16 (0x6400)
_PAIR_ASM = ("{{ .reg .b32 t, one, z; mov.b32 one, {one}; mov.b32 z, {{$3, $3}}; "
             "lop3.b32 t, $2, 0x000F000F, {base}, 0xea; fma.rn.{type}x2 t, t, one, z; mov.b32 {{$0, $1}}, t; }}")
_PAIR_ASM_BF16 = tl.constexpr(_PAIR_ASM.format(one="0x3F803F80", base="0x43004300", type="bf16"))
_PAIR_ASM_F16 = tl.constexpr(_PAIR_ASM.format(one="0x3C003C00", base="0x64006400", type="f16"))


@triton.jit
def _keep_load_layout(words):
    """words, unchanged. Taken apart from a broadcast copy, the tile's register layout is no longer propagated back
    to its load, so the words go to shared memory in the coalesced layout, 4 per thread (16-byte cp.async), and are
    read from there in the unpacking's layout; otherwise Triton loads them straight in that layout, one word per
    thread (4-byte cp.async, copies that conflict on shared-memory banks). Fewer instructions per value in every
    mode, but faster only for some of PACKED's tile shapes (bench/RESULTS.md), so PACKED tries it as a tuning
    choice; DEQUANT's 64x128x128 tiles came out NaN with it, so the GPU kernel tests run every tuning candidate."""
    kept, _copy = tl.split(tl.broadcast_to(words[:, :, None], words.shape + (2,)))
    return kept


@triton.jit
def _packed_tile(words, zero, IS_BF16: tl.constexpr, ASM: tl.constexpr):
    """4-bit words [BN, U] in fragment order -> the 16-bit codes minus zero points, q - z, [BN, U*8] in row order
    (exact: |q - z| <= 15). Pair i of a word (shifted right by 4i) holds codes i and i + 4, rows 8i + 2c and
    8i + 2c + 1 of its block (repack.fragment_rows). ASM: one and-or makes the pair the register of BASE + q in
    both halves and one paired FMA subtracts BASE + z (inline PTX: the interpreter cannot run it, so it takes the
    same values by plain arithmetic)."""
    BN: tl.constexpr = words.shape[0]
    U: tl.constexpr = words.shape[1]
    shifted = _pieces(words, 0, 0, 4, 0xFFFFFFFF, 4, False)  # [BN, U, 4]: the word >> 4i
    if ASM:
        # one asm instance per word: both halves come out as 16-bit registers, so the result does not depend on
        # how Triton lays the pair axis out (a packed instance, pack=2, would pair whatever two elements the
        # chosen layout puts side by side in a thread)
        if IS_BF16:
            minus_base_zero = (-(128.0 + zero)).to(tl.bfloat16)
            asm: tl.constexpr = _PAIR_ASM_BF16
        else:
            minus_base_zero = (-(1024.0 + zero)).to(tl.float16)
            asm: tl.constexpr = _PAIR_ASM_F16
        lo, hi = tl.inline_asm_elementwise(asm, "=h,=h,r,h", [shifted, minus_base_zero[:, None, None]],
                                           dtype=(minus_base_zero.dtype, minus_base_zero.dtype), is_pure=True, pack=1)
        pairs = tl.join(lo, hi)
    else:
        lo = (shifted & 0xF).to(tl.float32) - zero[:, None, None]
        hi = ((shifted >> 16) & 0xF).to(tl.float32) - zero[:, None, None]
        if IS_BF16:
            pairs = tl.join(lo, hi).to(tl.bfloat16)
        else:
            pairs = tl.join(lo, hi).to(tl.float16)
    # [BN, block, word c, pair i, half] -> rows 32 block + 8i + 2c + half
    pairs = tl.permute(tl.reshape(pairs, (BN, U // 4, 4, 4, 2)), (0, 1, 3, 2, 4))
    return tl.reshape(pairs, (BN, U * 8))


@triton.jit
def _tile_sum(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, M, N, K_X, num_rows, zero_const,
              t_begin, t_end, stride_xm,
              BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
              IS_BF16: tl.constexpr, DOT_IN_F32: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr,
              FRAGMENT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, X_IN_BOUNDS: tl.constexpr,
              TILES_PER_GROUP: tl.constexpr, PACKED_ASM: tl.constexpr, STAGED_WORDS: tl.constexpr,
              SCALE_AHEAD: tl.constexpr):
    """out^T tile [BN, BM] (float32) of rows offs_n and tokens offs_m, summed over K tiles [t_begin, t_end)."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    V: tl.constexpr = 32 // BITS
    UNITS: tl.constexpr = BK // V
    DIV: tl.constexpr = 1 << BITS
    if IS_BF16:
        BASE: tl.constexpr = 128.0
    else:
        BASE: tl.constexpr = 1024.0
    tile_rows = tl.arange(0, BK)
    unit_ids = tl.arange(0, UNITS)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if SCALE_AHEAD:
        # PACKED uses the scales only in the epilogue, in the accumulator's layout, where the software pipeline
        # does not copy them ahead, so the loop would wait on them
        scale_ahead = tl.load(scales_ptr + (t_begin // TILES_PER_GROUP) * N + offs_n, mask=n_ok, other=0.0)
    for t in range(t_begin, t_end):
        # PAIRS reads x in packed order (gathered in fragment order); the other modes put the tile in row order
        rows = compute_rows(t * BK + tile_rows, FRAGMENT and MODE == 0)
        xt = load_x_tile(x_ptr, perm_ptr, rows, offs_m, m_ok, stride_xm, num_rows, K_X, HAS_PERM, True,
                         X_IN_BOUNDS)  # [BK, BM]
        w_ptrs = qweight_ptr + (t * UNITS + unit_ids)[None, :] * N + offs_n[:, None]
        if EVEN_N and EVEN_K:
            words = tl.load(w_ptrs)
        else:
            units_ok = (t * UNITS + unit_ids) * V < num_rows
            words = tl.load(w_ptrs, mask=n_ok[:, None] & units_ok[None, :], other=0)
        words = words.to(tl.uint32, bitcast=True)
        if STAGED_WORDS:
            words = _keep_load_layout(words)

        if SCALE_AHEAD:
            scale = scale_ahead.to(tl.float32)
            t_ahead = tl.minimum(t + 1, t_end - 1)  # the last tile re-reads its own scales (in bounds, cached)
            scale_ahead = tl.load(scales_ptr + (t_ahead // TILES_PER_GROUP) * N + offs_n, mask=n_ok, other=0.0)
            zero = tile_zero(zeros_ptr, t // TILES_PER_GROUP, offs_n, n_ok, N, zero_const, HAS_ZEROS)
        else:
            # a constexpr divisor: the group of a tile costs a shift or a multiply, not an integer division
            scale, zero = tile_scale_zero(scales_ptr, zeros_ptr, t // TILES_PER_GROUP, offs_n, n_ok, N, zero_const,
                                          HAS_ZEROS)

        if MODE == 3:
            w = _packed_tile(words, zero, IS_BF16, PACKED_ASM)
            if DOT_IN_F32:
                part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(w, xt)
            acc += scale[:, None] * part
        elif MODE == 0:
            # x rows into the pair order of the weight tile's columns (see _pair_tile): a register permutation
            # on the way to shared memory, so x is still read contiguously
            xt = tl.reshape(tl.permute(tl.reshape(xt, (UNITS, 2, V // 2, BM)), (0, 2, 1, 3)), (BK, BM))
            w = _pair_tile(words, BITS, IS_BF16)
            if DOT_IN_F32:
                part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(w, xt)
            x_sum = tl.sum(xt.to(tl.float32), axis=0)
            acc += scale[:, None] * part - (scale * (BASE + zero))[:, None] * x_sum[None, :]
        else:
            if MODE == 1:
                f32 = _natural_tile(words, BITS)
                w = f32 * (scale * DIV)[:, None, None] - (scale * (DIV + zero))[:, None, None]
            else:
                SCALED_ZERO: tl.constexpr = 2.0 ** -LEFT_DENORMAL_EXP
                w = _pieces(words, scale, scale * zero * SCALED_ZERO, BITS, 0, V, True)
            w = _in_row_order(w, FRAGMENT).to(x_ptr.dtype.element_ty)
            if DOT_IN_F32:
                acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)

    if MODE == 2:
        UNSCALE: tl.constexpr = 2.0 ** LEFT_DENORMAL_EXP
        acc = acc * UNSCALE
    return acc


@triton.jit
def gptq_gemm_left_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K_X, num_rows, zero_const, tiles_per_split, stride_xm, stride_om,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    MODE: tl.constexpr, IS_BF16: tl.constexpr, DOT_IN_F32: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, FRAGMENT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, X_IN_BOUNDS: tl.constexpr, TILES_PER_GROUP: tl.constexpr,
    PACKED_ASM: tl.constexpr, STAGED_WORDS: tl.constexpr, SCALE_AHEAD: tl.constexpr, STREAM_K: tl.constexpr,
):
    """Program (tile, pid_k): out tile [BM, BN] over K tiles [pid_k*tiles_per_split, ...) of BK compute rows,
    each inside one group. Tiles run along N fastest, so programs that share an x block run together. DOT_IN_F32
    is for the interpreter only, whose tl.dot multiplies the raw bits of bfloat16 operands (Triton 3.9); PACKED_ASM
    (off in the interpreter) builds PACKED tiles with inline PTX. STAGED_WORDS and SCALE_AHEAD (PACKED only) copy
    the word tile to shared memory 16 bytes per thread (see _keep_load_layout) and load the scales one tile ahead.
    Neither changes a value; which is faster depends on the tile shape (the tuner times them).
    STREAM_K (stream-K): program p instead takes the (tile, K tile) units [p*tiles_per_split, (p+1)*tiles_per_split)
    of all tiles' K tiles laid end to end, so every program gets the same work however many tiles there are; a tile
    split between programs is summed in the workspace like a split-K tile."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BN)
    if STREAM_K:
        k_tiles = tl.cdiv(num_rows, BK)
        u = pid * tiles_per_split
        u_end = tl.minimum(u + tiles_per_split, tl.cdiv(M, BM) * grid_n * k_tiles)
        while u < u_end:
            tile_id = u // k_tiles
            t_begin = u - tile_id * k_tiles
            t_end = tl.minimum(k_tiles, t_begin + (u_end - u))
            tl.assume(t_end > t_begin)  # see split_tile_range
            offs_m = (tile_id // grid_n) * BM + tl.arange(0, BM)
            offs_n = (tile_id % grid_n) * BN + tl.arange(0, BN)
            acc = _tile_sum(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, M, N, K_X,
                            num_rows, zero_const, t_begin, t_end, stride_xm, BITS, BM, BN, BK, MODE, IS_BF16, DOT_IN_F32,
                            HAS_PERM, HAS_ZEROS, FRAGMENT, EVEN_N, EVEN_K, X_IN_BOUNDS, TILES_PER_GROUP, PACKED_ASM,
                            STAGED_WORDS, SCALE_AHEAD)
            # the programs whose unit ranges meet this tile's
            sharing = (tile_id * k_tiles + k_tiles - 1) // tiles_per_split - (tile_id * k_tiles) // tiles_per_split + 1
            finish_tile(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr,
                        counter_ptr, tile_id, sharing, HAS_BIAS)
            u += t_end - t_begin
    else:
        pid_k = tl.program_id(1)
        pid_m = pid // grid_n
        pid_n = pid % grid_n
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        t_begin, t_end = split_tile_range(num_rows, pid_k, tiles_per_split, BK)
        acc = _tile_sum(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, M, N, K_X, num_rows,
                        zero_const, t_begin, t_end, stride_xm, BITS, BM, BN, BK, MODE, IS_BF16, DOT_IN_F32, HAS_PERM,
                        HAS_ZEROS, FRAGMENT, EVEN_N, EVEN_K, X_IN_BOUNDS, TILES_PER_GROUP, PACKED_ASM, STAGED_WORDS,
                        SCALE_AHEAD)
        finish_tile(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr,
                    pid_m * grid_n + pid_n, SPLIT_K, HAS_BIAS)


@dataclass(frozen=True)
class LeftGemmConfig:
    """Launch parameters of gptq_gemm_left_kernel (block_m is the token side of the tile, >= 16)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    mode: int = LEFT_PAIRS
    num_warps: int = 4
    num_stages: int = 3
    staged_words: bool = False
    scale_ahead: bool = False
    # > 0: that many persistent programs share all tiles' K tiles evenly (stream-K) instead of a (tile, split)
    # grid; split_k must then be 1
    stream_programs: int = 0


def left_config_valid(weight: GptqComputeWeight, config: LeftGemmConfig, dtype: torch.dtype) -> bool:
    """Whether the kernel can run this config: 2/4/8-bit codes, K tiles inside groups and whole words, exact
    16-bit codes for PAIRS (8-bit codes do not fit bfloat16's mantissa next to the base), fragment order for
    PACKED."""
    if weight.bits not in LEFT_BITS or dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.group_rows % config.block_k or config.block_k < 16 or config.block_k % (32 // weight.bits):
        return False
    if config.mode == LEFT_PAIRS and dtype == torch.bfloat16 and weight.bits > 7:
        return False
    if config.mode == LEFT_DENORMAL and dtype != torch.bfloat16:
        return False  # float16 cannot hold the scaled-down tile values
    if config.mode == LEFT_PACKED and not weight.fragment_order:
        return False  # the code pairs are the fragment's row pairs only in fragment order (4-bit)
    if weight.fragment_order and config.mode != LEFT_PAIRS and config.block_k % 32:
        return False  # the fragment-order tile is built from whole blocks of 32 rows
    if config.staged_words and config.mode != LEFT_PACKED:
        # DENORMAL staged was never faster than unstaged, and DEQUANT's 64x128x128 split-K tiles came out NaN
        return False
    if config.scale_ahead and config.mode != LEFT_PACKED:
        return False  # the other modes use the scales while they build the tile
    if config.stream_programs < 0 or (config.stream_programs and config.split_k != 1):
        return False  # stream-K chooses each program's K range itself
    return config.block_m >= 16 and config.block_n >= 16


def x_in_bounds(x: torch.Tensor, weight: GptqComputeWeight, block_m: int, block_k: int) -> bool:
    """Whether every x tile a launch reads lies inside x: no permutation, compute rows = input columns, and M and
    K multiples of the tile."""
    return (weight.perm is None and weight.k_rows == weight.in_features and weight.k_rows % block_k == 0
            and x.shape[0] % block_m == 0)


@dataclass(frozen=True)
class _LeftLaunch:
    """How a config launches on an M x N layer: the grid, K tiles per split (units per program for stream-K), the
    SPLIT_K constexpr, and the workspace its programs need to share tiles."""

    grid: tuple[int, int]
    tiles_per_split: int
    split_k: int
    partials: int
    counters: int


def _left_launch(m: int, weight: GptqComputeWeight, config: LeftGemmConfig) -> _LeftLaunch:
    n = weight.out_features
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(weight.k_rows, config.block_k)
    if config.stream_programs:
        tiles_per_split, programs = stream_k_sizes(tiles, k_tiles, config.stream_programs)
        grid, split_k = (programs, 1), 1
        shares = tiles_per_split % k_tiles != 0  # unless every program's range is whole tiles
    else:
        tiles_per_split, split_k = split_k_sizes(k_tiles, config.split_k)
        grid, shares = (tiles, split_k), split_k > 1
    partials, counters = (m * n, tiles) if shares else (0, 0)
    return _LeftLaunch(grid, tiles_per_split, split_k, partials, counters)


def left_workspace(m: int, weight: GptqComputeWeight, config: LeftGemmConfig) -> tuple[int, int]:
    """(float32 partial sums, int32 counters) a launch needs: [M, N] sums and a counter per tile where programs
    share tiles (split-K; stream-K unless every program's range is whole tiles), else none."""
    launch = _left_launch(m, weight, config)
    return launch.partials, launch.counters


def gptq_gemm_left(x: torch.Tensor, weight: GptqComputeWeight, config: LeftGemmConfig, out: torch.Tensor,
                   workspace: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias). With split_k > 1 or stream_programs, workspace float32 [>= M*N] and
    counters int32 [>= tiles] must be zero on entry; they are zero again on return."""
    check_matmul_input(x, weight, "gptq_gemm_left")
    if not left_config_valid(weight, config, x.dtype):
        raise ValueError(f"config {config} cannot run on this {weight.bits}-bit layer with {x.dtype} input")
    m, n = x.shape[0], weight.out_features
    launch = _left_launch(m, weight, config)
    if workspace.numel() < launch.partials or counters.numel() < launch.counters:
        raise ValueError(f"workspace too small for {config}: {launch.partials} partial sums and {launch.counters} "
                         "counters needed")
    gptq_gemm_left_kernel[launch.grid](
        *kernel_tensors(x, weight, out, workspace, counters),
        m, n, weight.in_features, weight.k_rows, weight.zero_const, launch.tiles_per_split,
        x.stride(0), out.stride(0),
        BITS=weight.bits, BM=config.block_m, BN=config.block_n, BK=config.block_k, SPLIT_K=launch.split_k,
        MODE=config.mode, IS_BF16=x.dtype == torch.bfloat16,
        DOT_IN_F32=x.dtype == torch.bfloat16 and triton_interpreted(), **weight_flags(weight),
        EVEN_N=n % config.block_n == 0, EVEN_K=weight.k_rows % config.block_k == 0,
        X_IN_BOUNDS=x_in_bounds(x, weight, config.block_m, config.block_k),
        TILES_PER_GROUP=weight.group_rows // config.block_k, PACKED_ASM=not triton_interpreted(),
        STAGED_WORDS=config.staged_words, SCALE_AHEAD=config.scale_ahead, STREAM_K=config.stream_programs > 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
