"""What the GPTQ kernels share. Device functions: code extraction from packed words as exact floats, per-tile
scale/zero and x loads, and the split-K epilogue that reduces partial tiles through a self-cleaning float32
workspace. Launch side: the pointer arguments, flags and split-K sizing every wrapper passes the same way."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.kernels.repack import GptqComputeWeight


@triton.jit
def extract_code(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr):
    """Code J (0-based) of a packing unit as uint32. A unit is one word of 32/BITS codes, or for 3 bits three
    words holding 32 codes as one little-endian bit stream (w0 | w1 << 32 | w2 << 64). Words are uint32."""
    POS: tl.constexpr = J * BITS
    WORD: tl.constexpr = POS // 32
    OFF: tl.constexpr = POS % 32
    MASK: tl.constexpr = (1 << BITS) - 1
    if WORD == 0:
        lo = w0
    elif WORD == 1:
        lo = w1
    else:
        lo = w2
    if OFF + BITS <= 32:
        code = (lo >> OFF) & MASK
    else:
        if WORD == 0:
            hi = w1
        else:
            hi = w2
        code = ((lo >> OFF) | (hi << (32 - OFF))) & MASK
    return code


@triton.jit
def code_as_f32(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr):
    """Code q of unit position J as the float32 1 + q / 2**BITS, built from bits (no int->float conversion):
    the code lands in the top of the mantissa of 1.0. Exact for every q."""
    MANT: tl.constexpr = 23 - BITS
    POS: tl.constexpr = J * BITS
    OFF: tl.constexpr = POS % 32
    FIELD: tl.constexpr = ((1 << BITS) - 1) << MANT
    if OFF + BITS <= 32:
        WORD: tl.constexpr = POS // 32
        if WORD == 0:
            src = w0
        elif WORD == 1:
            src = w1
        else:
            src = w2
        # one shift straight to the mantissa position, then one and-or
        if OFF >= MANT:
            placed = src >> (OFF - MANT)
        else:
            placed = src << (MANT - OFF)
        bits = (placed & FIELD) | 0x3F800000
    else:
        bits = (extract_code(w0, w1, w2, J, BITS) << MANT) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


# Denormal codes (2, 4 and 8 bits): a code masked in place, with no shift, read as float32 bits is the subnormal
# q * 2^(OFF - 149); multiplied by x * 2^(149 - OFF - DENORMAL_EXP) it gives x * q * 2^-DENORMAL_EXP exactly (x's 8
# or 11 significant bits times q's 8 at most fit float32's 24), and FFMA takes subnormal inputs at full rate.
# Codes that reach the exponent bits (OFF + BITS > 23) come from the word shifted right by 12 once. One AND and one
# FFMA per code instead of a shift, an and-or and an FFMA. DENORMAL_EXP = 87 keeps x * 2^(149 - OFF - 87) <= x * 2^62
# finite for |x| < 2^65 and the products normal for |x * q| >= 2^-39.
DENORMAL_EXP = 87
DENORMAL_SCALE = tl.constexpr(2.0 ** DENORMAL_EXP)  # what sum(x' * d) is multiplied by to give sum(x * q)


@triton.jit
def code_as_denormal(w0, J: tl.constexpr, BITS: tl.constexpr):
    """Code J of a one-word unit (BITS 2, 4 or 8) as the float32 q * 2^(off - 149), off its bit offset in the word,
    or in the word >> 12 for codes that would reach the exponent bits."""
    OFF: tl.constexpr = (J * BITS) % 32
    MASK: tl.constexpr = (1 << BITS) - 1
    if OFF + BITS > 23:
        FIELD_HIGH: tl.constexpr = MASK << (OFF - 12)
        bits = (w0 >> 12) & FIELD_HIGH
    else:
        FIELD: tl.constexpr = MASK << OFF
        bits = w0 & FIELD
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def x_for_denormal_code(x, J: tl.constexpr, BITS: tl.constexpr):
    """x * 2^(149 - offset - 87): the factor that turns code J's subnormal into q * 2^-87 (a power of two: exact)."""
    OFF: tl.constexpr = (J * BITS) % 32
    if OFF + BITS > 23:
        E: tl.constexpr = 62 - (OFF - 12)  # 62 = 149 - DENORMAL_EXP
    else:
        E: tl.constexpr = 62 - OFF
    return x * (1 << E)


@triton.jit
def compute_rows(positions, FRAGMENT: tl.constexpr):
    """The compute rows of packed positions: the positions themselves, or in fragment order their image under
    repack.fragment_rows (inside each block of 32, position 8c + j holds row 8(j % 4) + 2c + j // 4; the same
    expression, written for the kernels)."""
    if FRAGMENT:
        rows = (positions & ~31) | ((positions & 3) << 3) | (((positions >> 3) & 3) << 1) | ((positions >> 2) & 1)
    else:
        rows = positions
    return rows


@triton.jit
def code_rows(unit_row0, J: tl.constexpr, FRAGMENT: tl.constexpr):
    """The compute rows of code J of one-word units whose code 0 sits at unit_row0 (compute_rows of the units'
    first packed positions): unit_row0 + J, or in fragment order unit_row0 + 8 (J % 4) + J // 4."""
    if FRAGMENT:
        rows = unit_row0 + (8 * (J % 4) + J // 4)
    else:
        rows = unit_row0 + J
    return rows


@triton.jit
def tile_zero(zeros_ptr, group, offs_n, n_ok, N, zero_const, HAS_ZEROS: tl.constexpr):
    """The zero points float32 [BLOCK_N] of a group: zero_const for every column when the layer has no zero
    tensor (without reading the scales, unlike tile_scale_zero)."""
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_ok, other=0).to(tl.float32)
    else:
        zero = tl.zeros(offs_n.shape, dtype=tl.float32) + zero_const
    return zero


@triton.jit
def tile_scale_zero(scales_ptr, zeros_ptr, group, offs_n, n_ok, N, zero_const, HAS_ZEROS: tl.constexpr):
    """(scale, zero) float32 [BLOCK_N] of a group; zero is zero_const for every column when the layer has no zero
    tensor."""
    scale = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_ok, other=0).to(tl.float32)
    else:
        zero = scale * 0.0 + zero_const
    return scale, zero


@triton.jit
def split_tile_range(num_rows, pid_k, tiles_per_split, BK: tl.constexpr):
    """[t_begin, t_end): the K tiles of BK compute rows that split pid_k reduces."""
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(num_rows, BK))
    # split_k_sizes leaves no split empty. Without this the K loop gets a zero-trip path that sets the accumulator
    # to zero after the loop, and ptxas then serializes every wgmma of the loop (advisory C7515: "non wgmma
    # instructions defining accumulator registers"), waiting for each MMA before the next tile is unpacked
    tl.assume(t_end > t_begin)
    return t_begin, t_end


@triton.jit
def load_x_tile(x_ptr, perm_ptr, rows, offs_m, m_ok, stride_xm, num_rows, K_X,
                HAS_PERM: tl.constexpr, K_MAJOR: tl.constexpr, IN_BOUNDS: tl.constexpr = False):
    """x at rows offs_m and the input columns of compute rows `rows`, as [BM, BK] ([BK, BM] with K_MAJOR); zero
    for padding rows of the permutation, rows past K and rows past M. IN_BOUNDS: the caller knows every row and
    column is inside x (no permutation, M and K multiples of the tile), so the load needs no mask: at large M
    the per-element mask and zero-fill selects cost about half as many instructions per weight value as
    unpacking the value does."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + rows, mask=rows < num_rows, other=-1)
        ok = cols >= 0
    else:
        cols = rows
        ok = rows < K_X
    if K_MAJOR:
        ptrs = x_ptr + offs_m[None, :] * stride_xm + cols[:, None]
        mask = m_ok[None, :] & ok[:, None]
    else:
        ptrs = x_ptr + offs_m[:, None] * stride_xm + cols[None, :]
        mask = m_ok[:, None] & ok[None, :]
    # one return statement: the compiler unifies the types of all returns, even under a constexpr branch
    if IN_BOUNDS:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


@triton.jit
def store_output(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS: tl.constexpr):
    """out[m, n] = acc + bias[n], cast to the output dtype; acc float32 [BM, BN]."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_partial_tile(acc, offs_m, offs_n, M, N, ws_ptr, counter_ptr, tile_id):
    """Adds a split's partial tile into the float32 workspace [M, N] and counts the split in: (workspace pointers,
    mask, how many splits had arrived before this one)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
    # every thread's partial add is issued before the one release on the counter
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel")
    return ws_ptrs, mask, arrived


@triton.jit
def finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id, parts,
                HAS_BIAS: tl.constexpr):
    """Write one output tile, or one of the `parts` partial sums the tile's K range is divided into (split-K
    passes its constexpr SPLIT_K, stream-K a runtime count): every part is added into the float32 workspace
    [M, N]; the last to arrive (by an atomic counter) reads the total back and zeroes the workspace, writes the
    output and resets the counter, so both are zero again for the next call and no memset launch is needed."""
    if parts == 1:
        store_output(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
    else:
        reduce_partial_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id,
                            parts, HAS_BIAS)


@triton.jit
def reduce_partial_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id,
                        parts, HAS_BIAS: tl.constexpr):
    """Adds one of a tile's `parts` partial sums into the workspace; the last to arrive writes the output and
    leaves workspace and counter zero."""
    ws_ptrs, mask, arrived = add_partial_tile(acc, offs_m, offs_n, M, N, ws_ptr, counter_ptr, tile_id)
    if arrived == parts - 1:
        # the sums are read by atomics (adding zero: vector atomics, a quarter of the operations of one
        # exchange per element): a plain load here can return sums that have not all arrived, while atomics see
        # every other program's atomic adds (bench/split_k_reduction.py)
        total = tl.atomic_add(ws_ptrs, tl.zeros(acc.shape, dtype=tl.float32), mask=mask, sem="relaxed")
        # no barrier needed: the read-back and the zeroing store share ws_ptrs and so its layout, and each thread
        # zeroes only what it has read (a zeroing store in another layout than its load races with the reads)
        tl.store(ws_ptrs, tl.zeros(acc.shape, dtype=tl.float32), mask=mask)
        total = tl.where(mask, total, 0.0)
        store_output(total, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
        tl.atomic_xchg(counter_ptr + tile_id, 0, sem="relaxed")


def kernel_tensors(x: torch.Tensor, weight: GptqComputeWeight, out: torch.Tensor, workspace: torch.Tensor,
                   counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pointer arguments of every GPTQ kernel, in their order. An absent zeros/perm/bias is passed as another
    tensor of the layer: its HAS_* flag is off, so the kernel never reads it."""
    return (
        x, weight.qweight, weight.scales,
        weight.zeros if weight.zeros is not None else weight.scales,
        weight.perm if weight.perm is not None else weight.qweight,
        weight.bias if weight.bias is not None else weight.scales,
        out, workspace, counters,
    )


def weight_flags(weight: GptqComputeWeight) -> dict[str, bool]:
    """HAS_PERM, HAS_ZEROS, HAS_BIAS and FRAGMENT of a layer, as the kernels take them."""
    return {"HAS_PERM": weight.perm is not None, "HAS_ZEROS": weight.zeros is not None,
            "HAS_BIAS": weight.bias is not None, "FRAGMENT": weight.fragment_order}


def split_k_sizes(total_tiles: int, requested_split: int) -> tuple[int, int]:
    """(tiles per split, splits) for `requested_split` splits of total_tiles K tiles, with no split left empty."""
    tiles_per_split = triton.cdiv(total_tiles, requested_split)
    return tiles_per_split, triton.cdiv(total_tiles, tiles_per_split)


def stream_k_sizes(tiles: int, k_tiles: int, requested_programs: int) -> tuple[int, int]:
    """(units per program, programs) for stream-K: the tiles' K tiles laid end to end (tiles * k_tiles units)
    in equal contiguous ranges over at most requested_programs programs, with no program left empty."""
    units = tiles * k_tiles
    per_program = triton.cdiv(units, max(1, min(requested_programs, units)))
    return per_program, triton.cdiv(units, per_program)


def check_split_workspace(split_k: int, workspace: torch.Tensor, counters: torch.Tensor, partials: int,
                          tiles: int) -> None:
    """ValueError unless a split-K launch has room for `partials` float32 sums and `tiles` arrival counters."""
    if split_k > 1 and (workspace.numel() < partials or counters.numel() < tiles):
        raise ValueError("split-K workspace too small for this call")


def check_matmul_input(x: torch.Tensor, weight: GptqComputeWeight, kernel: str) -> None:
    """ValueError unless x is [M, in_features] with unit column stride, as the tl.dot kernels read it."""
    if x.dim() != 2 or x.shape[1] != weight.in_features or x.stride(1) != 1:
        raise ValueError(f"{kernel} expects x [M, {weight.in_features}] with unit column stride, got {tuple(x.shape)}")
