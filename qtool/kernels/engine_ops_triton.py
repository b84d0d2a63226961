"""Triton versions of the engine's per-token operations (engine_ops_ref.py holds their torch references, the
signatures and the semantics): paged decode attention (GQA, optional split-K over the context), residual add +
RMSNorm, SiLU times up, and RoPE fused with the KV cache write. Every launch is CUDA-graph safe: no host sync, grid
sizes and split counts from static shapes only, data-dependent bounds (context lengths, slots) read on the GPU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from qtool.core.errors import QtoolError

LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # one K/V tile row in registers; wider heads go to the reference
MAX_SPLITS = 64
# the q4 decode kernel rotates values back with one [d, d] float32 tile (a 256-wide one would not fit shared memory)
Q4_MAX_HEAD_DIM = 128


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _output(out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    """A new contiguous output, or the caller's buffer (a captured step's static tensor) after checking it."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise QtoolError(f"{what}: out is {tuple(out.shape)} {out.dtype} on {out.device}; it must be a contiguous "
                         f"{tuple(shape)} {dtype} on {device}")
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 -> dtype rounding to nearest even. bfloat16 is rounded by hand: the interpreter (Triton 3.9)
    truncates float32 -> bfloat16; on a GPU this gives the hardware conversion's bits (NaN and inf stay so)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# paged decode attention


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                         q_sb, q_sh, k_sn, k_sb, k_sh, v_sn, v_sb, v_sh, ks_sn, ks_sb, ks_sh, vs_sn, vs_sb, vs_sh,
                         t_sb, o_sb, o_sh, qk_scale, window, tokens_per_split,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
                         ROUND_P: tl.constexpr, KV_SCALED: tl.constexpr):
    """Program (b, kv head, split): the GROUP query heads of this kv head against context tokens
    [split * tokens_per_split, (split + 1) * tokens_per_split) of sequence b (clipped to its length and window),
    online softmax in float32 on log2-scaled scores. With one split the normalised rows go to out; else the
    unnormalised-then-divided partial row, its running max and sum go to the split workspace for the reduce.
    DOT_F32: both products in float32 (a float32 or mixed-dtype query/cache, and bfloat16 under the interpreter,
    whose tl.dot multiplies bfloat16's raw bits); ROUND_P then rounds the weights to the values' dtype first, as
    the native path does. KV_SCALED (the q8 cache): k/v hold int8 codes with a scale per (token, kv head) at
    ks/vs; the codes (exact in 16-bit floats) meet the query in its dtype, each score is scaled by its key's
    scale and each weight by its value's before the value product."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + b).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(context - window, 0)
    begin = split * tokens_per_split
    end = tl.minimum(begin + tokens_per_split, context)
    # start at the tile holding the window's first token (tiles stay aligned to BLOCK_N, as splits are)
    begin = tl.maximum(begin, (lo // BLOCK_N) * BLOCK_N)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    elif not KV_SCALED:
        q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    table_row = table_ptr + b.to(tl.int64) * t_sb
    for start in range(begin, end, BLOCK_N):
        pos = start + n
        valid = (pos < end) & (pos >= lo)
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * k_sn + offset[:, None] * k_sb + kvh * k_sh + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + block[:, None] * v_sn + offset[:, None] * v_sb + kvh * v_sh + d[None, :],
                    mask=kv_mask, other=0.0)
        if KV_SCALED:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if DOT_F32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        if KV_SCALED:
            key_scale = tl.load(ks_ptr + block * ks_sn + offset * ks_sb + kvh * ks_sh, mask=valid, other=0.0)
            scores = scores * key_scale.to(tl.float32)[None, :]
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays empty, not NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_SCALED:
            value_scale = tl.load(vs_ptr + block * vs_sn + offset * vs_sb + kvh * vs_sh, mask=valid, other=0.0)
            p = p * value_scale.to(tl.float32)[None, :]
        if DOT_F32:
            if ROUND_P:  # to the values' dtype: the query's where they are codes
                if KV_SCALED:
                    p = _cast(p, q_ptr.dtype.element_ty).to(tl.float32)
                else:
                    p = _cast(p, v_ptr.dtype.element_ty).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_rows = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # context 0: acc is 0, the row stays 0
    _store_split_rows(out_ptr, part_o_ptr, part_ml_ptr, out_rows, m_i, l_i, b, split, heads, d, g_ok, d_ok, o_sb, o_sh,
                      GROUP, BLOCK_D, NUM_SPLITS)


@triton.jit
def _store_split_rows(out_ptr, part_o_ptr, part_ml_ptr, out_rows, m_i, l_i, b, split, heads, d, g_ok, d_ok, o_sb, o_sh,
                      GROUP: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """A decode program's end (the float and the q4 kernel's): its normalised rows [BLOCK_G, BLOCK_D] for query
    heads `heads` to out with one split; else the rows, running max and sum to the workspace that
    _split_reduce_kernel combines."""
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + d[None, :],
                 _cast(out_rows, out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # workspace [B, heads, NUM_SPLITS, BLOCK_D] and [B, heads, NUM_SPLITS, 2] (max, sum), contiguous
        row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + row[:, None] * BLOCK_D + d[None, :], out_rows, mask=g_ok[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _split_reduce_kernel(part_o_ptr, part_ml_ptr, out_ptr, o_sb, o_sh, heads,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    """Program (b, head): the splits' partial rows weighted by sum * 2^(max - overall max); all splits empty
    (context 0) gives a row of zeros."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    row = (b.to(tl.int64) * heads + h) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(l_s > 0.0, l_s * tl.exp2(m - m_max), 0.0)
    o = tl.load(part_o_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None] & (l_s > 0.0)[:, None],
                other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * o_sb + h * o_sh + d, _cast(out, out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_tile_tokens(head_dim: int) -> int:
    """Context tokens one program reads per loop step (a K and a V tile of BLOCK_N x head_dim in registers)."""
    return 64 if _pow2(head_dim) <= 128 else 32


def decode_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, head_dim: int, num_sms: int) -> int:
    """How many programs share one sequence's context (flash-decoding), from static sizes only so a captured
    graph keeps it: enough (batch x kv_heads x splits) programs for about two per SM, each split keeping at least
    two K/V tiles of the longest context the block table can hold. Batches that fill the GPU get one split."""
    programs = batch * kv_heads
    if programs >= num_sms:
        return 1
    tiles = triton.cdiv(max_blocks * block_size, decode_tile_tokens(head_dim))
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, tiles // 2, MAX_SPLITS))


def _split_k_decode(launch, out: torch.Tensor, kv_heads: int, max_blocks: int, block_size: int, block_d: int,
                    block_n: int, num_splits: int | None) -> torch.Tensor:
    """Flash-decoding around a decode kernel (the float and the q4 one): picks the split count (decode_splits'
    rule where num_splits is None), calls launch(num_splits, tokens_per_split, part_o, part_ml) to run the kernel
    on grid (batch, kv_heads, num_splits), then with more than one split has _split_reduce_kernel combine the
    splits' float32 partial rows and (max, sum) pairs into out [B, heads, d]. Returns out."""
    batch, heads, head_dim = out.shape
    if num_splits is None:
        # the interpreter (CPU tests) gets a pretend 4-SM device, so the rule splits small batches there too
        num_sms = (torch.cuda.get_device_properties(out.device).multi_processor_count if out.is_cuda else 4)
        num_splits = decode_splits(batch, kv_heads, max_blocks, block_size, head_dim, num_sms)
    # each split's token range is a whole number of tiles, so tiles never straddle two splits
    tokens_per_split = triton.cdiv(triton.cdiv(max_blocks * block_size, num_splits), block_n) * block_n
    if num_splits > 1:
        part_o = torch.empty((batch, heads, num_splits, block_d), dtype=torch.float32, device=out.device)
        part_ml = torch.empty((batch, heads, num_splits, 2), dtype=torch.float32, device=out.device)
    else:
        part_o = part_ml = out  # unused: the kernel writes its normalised rows to out
    launch(num_splits, tokens_per_split, part_o, part_ml)
    if num_splits > 1:
        _split_reduce_kernel[(batch, heads)](
            part_o, part_ml, out, out.stride(0), out.stride(1), heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, BLOCK_S=_pow2(num_splits), num_warps=4)
    return out


def paged_decode_attention_problem(query: torch.Tensor, key_cache: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these tensors (then the reference runs), or None."""
    if query.dtype not in KERNEL_DTYPES or key_cache.dtype not in KERNEL_DTYPES:
        return f"paged decode attention: query {query.dtype} / cache {key_cache.dtype} (kernel: float16, bfloat16, float32)"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"paged decode attention: head_dim {query.shape[-1]} is over the kernel's {MAX_HEAD_DIM}"
    return None


def paged_decode_attention_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None, num_splits: int | None = None,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """engine_ops_ref.paged_decode_attention_ref on the GPU. num_splits None: decode_splits' rule (the argument
    exists for tests). out: a contiguous [B, heads, d] buffer of query's dtype to write into."""
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, cache_dim = key_cache.shape
    if cache_dim != head_dim or value_cache.shape != key_cache.shape or heads % kv_heads:
        raise QtoolError(f"paged decode attention: query {tuple(query.shape)} does not fit cache "
                         f"{tuple(key_cache.shape)} / {tuple(value_cache.shape)} (heads a multiple of kv_heads)")
    problem = paged_decode_attention_problem(query, key_cache)
    if problem:
        raise QtoolError(problem)
    query, key_cache, value_cache, block_tables, context_lens = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (query, key_cache, value_cache, block_tables, context_lens))
    max_blocks = block_tables.shape[1]
    block_d = max(_pow2(head_dim), 16)
    block_n = decode_tile_tokens(head_dim)
    native = query.dtype == key_cache.dtype == value_cache.dtype and query.dtype != torch.float32
    round_p = native and query.dtype == torch.bfloat16 and triton_interpreted()
    dot_f32 = not native or round_p
    out = _output(out, query.shape, query.dtype, query.device, "paged decode attention")
    if batch == 0:
        return out
    launch = _decode_launch(query, key_cache, value_cache, None, None, block_tables, context_lens, out, scale,
                            sliding_window, dot_f32, round_p)
    return _split_k_decode(launch, out, kv_heads, max_blocks, block_size, block_d, block_n, num_splits)


def _decode_launch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   key_scales: torch.Tensor | None, value_scales: torch.Tensor | None, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, out: torch.Tensor, scale: float, sliding_window: int | None,
                   dot_f32: bool, round_p: bool):
    """The launch _split_k_decode calls for _paged_decode_kernel: float caches, or with key/value scales
    [num_blocks, block_size, kv_heads, 1] the q8 cache's codes."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    block_d = max(_pow2(head_dim), 16)
    scaled = key_scales is not None
    key_scales = key_scales if scaled else key_cache  # not read without KV_SCALED
    value_scales = value_scales if scaled else value_cache
    window = int(sliding_window) if sliding_window is not None else 0

    def launch(num_splits: int, tokens_per_split: int, part_o: torch.Tensor, part_ml: torch.Tensor) -> None:
        _paged_decode_kernel[(batch, kv_heads, num_splits)](
            query, key_cache, value_cache, key_scales, value_scales, block_tables, context_lens, out, part_o, part_ml,
            query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), key_scales.stride(0),
            key_scales.stride(1), key_scales.stride(2), value_scales.stride(0), value_scales.stride(1),
            value_scales.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), float(scale) * LOG2E, window,
            tokens_per_split, GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_G=max(_pow2(heads // kv_heads), 16), BLOCK_D=block_d, BLOCK_N=decode_tile_tokens(head_dim),
            NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None, DOT_F32=dot_f32, ROUND_P=round_p,
            KV_SCALED=scaled, num_warps=4 if block_d <= 128 else 8, num_stages=2)

    return launch


def paged_decode_attention_q8_triton(query: torch.Tensor, key_codes: torch.Tensor, key_scales: torch.Tensor,
                                     value_codes: torch.Tensor, value_scales: torch.Tensor, rotation: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                     sliding_window: int | None = None,
                                     num_splits: int | None = None) -> torch.Tensor:
    """engine_ops_ref.paged_decode_attention_q8_ref on the GPU: the query turned into the stored vectors' frame
    (q @ rotation: an orthogonal turn keeps every score), _paged_decode_kernel over the codes and their scales
    (float32 rows, so the turn back is rounded once), the rows turned back (@ rotation^T). All whole-tensor ops:
    a captured graph keeps them."""
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, code_dim = key_codes.shape
    if (code_dim != head_dim or value_codes.shape != key_codes.shape or heads % kv_heads
            or key_scales.shape != (num_blocks, block_size, kv_heads, 1) or value_scales.shape != key_scales.shape
            or rotation.shape != (head_dim, head_dim) or key_codes.dtype != torch.int8
            or value_codes.dtype != torch.int8):
        raise QtoolError(f"paged decode attention (q8): query {tuple(query.shape)}, codes {tuple(key_codes.shape)} "
                         f"{key_codes.dtype} / {tuple(value_codes.shape)}, scales {tuple(key_scales.shape)}, rotation "
                         f"{tuple(rotation.shape)} (int8 codes [blocks, block_size, kv_heads, d], scales [..., 1])")
    if query.dtype not in KERNEL_DTYPES or head_dim > MAX_HEAD_DIM:
        raise QtoolError(f"paged decode attention (q8): query {query.dtype} with head_dim {head_dim} (kernel: "
                         f"float16, bfloat16, float32 up to {MAX_HEAD_DIM})")
    rotation = rotation.float()
    turned = (query.float() @ rotation).to(query.dtype).contiguous()
    key_codes, value_codes, key_scales, value_scales, block_tables, context_lens = (
        t if t.stride(-1) == 1 else t.contiguous()
        for t in (key_codes, value_codes, key_scales, value_scales, block_tables, context_lens))
    native = query.dtype != torch.float32
    round_p = native and query.dtype == torch.bfloat16 and triton_interpreted()
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    if batch == 0:
        return out.to(query.dtype)
    launch = _decode_launch(turned, key_codes, value_codes, key_scales, value_scales, block_tables, context_lens, out,
                            scale, sliding_window, not native or round_p, round_p)
    _split_k_decode(launch, out, kv_heads, block_tables.shape[1], block_size, max(_pow2(head_dim), 16),
                    decode_tile_tokens(head_dim), num_splits)
    return (out @ rotation.T).to(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# paged decode attention over the q4 cache


@triton.jit
def _q4_nibbles(row_ptr, cols, mask):
    """The 4-bit codes of columns cols [D] of rows row_ptr [N] (two per byte, column 2j low, 2j + 1 high): float32
    [N, D]."""
    packed = tl.load(row_ptr[:, None] + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
    return ((packed >> ((cols % 2) * 4)[None, :]) & 15).to(tl.float32)


@triton.jit
def _q4_decode_kernel(q_ptr, kc_ptr, kp_ptr, vc_ptr, vp_ptr, ks_ptr, vs_ptr, rot_ptr, cos_ptr, sin_ptr,
                      table_ptr, lens_ptr, own_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                      q_sb, q_sh, kc_sn, kc_sb, kc_sh, kp_sn, kp_sh, kp_s2, vc_sn, vc_sb, vc_sh,
                      vp_sn, vp_sb, vp_sh, ks_sn, ks_sb, ks_sh, vs_sn, vs_sb, vs_sh, c_s, t_sb, o_sb, o_sh,
                      qk_scale, window, max_position, tokens_per_split,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      VALUE_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Program (b, kv head, split): the GROUP query heads of this kv head against context tokens
    [split * tokens_per_split, (split + 1) * tokens_per_split) of sequence b (clipped to its length and window),
    online softmax in float32 on log2-scaled scores. Each context token's key is dequantized (or, in the sequence's
    own block with a staging slot, read from it), turned by RoPE at its position, and its value dequantized in the
    rotated basis (accumulated apart, rotated back once at the end) or read exact from the slot. With one split the
    normalised rows go to out; else each split's rows, running max and sum go to the workspace that
    _split_reduce_kernel combines (as the float kernel's)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + b).to(tl.int32)
    own_slot = tl.load(own_ptr + b).to(tl.int64)
    own_start = (tl.maximum(context - 1, 0) // BLOCK_SIZE) * BLOCK_SIZE
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(context - window, 0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    partner = (d + HALF) % HEAD_DIM  # rotate-half: column d pairs with d +- HALF
    sign = tl.where(d < HALF, -1.0, 1.0)
    value_group = d // (HEAD_DIM // VALUE_GROUPS)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc_rotated = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # quantized values, in the rotated basis
    acc_exact = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # the own block's staged values
    n = tl.arange(0, BLOCK_N)
    table_row = table_ptr + b.to(tl.int64) * t_sb
    begin = split * tokens_per_split
    end = tl.minimum(begin + tokens_per_split, context)
    # start at the tile holding the window's first token (tiles stay aligned to BLOCK_N, as splits are)
    begin = tl.maximum(begin, (lo // BLOCK_N) * BLOCK_N)
    for start in range(begin, end, BLOCK_N):
        pos = start + n
        valid = (pos < end) & (pos >= lo)
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offset = (pos % BLOCK_SIZE).to(tl.int64)
        own = valid & (pos >= own_start) & ((own_slot + tl.zeros_like(pos)) >= 0)  # a tensor: a mask
        quantized = valid & ~own
        mask = quantized[:, None] & d_ok[None, :]
        own_mask = own[:, None] & d_ok[None, :]
        # keys before RoPE: columns d and their RoPE partners
        key_rows = kc_ptr + block * kc_sn + offset * kc_sb + kvh * kc_sh
        params = kp_ptr + block[:, None] * kp_sn + kvh * kp_sh
        k_d = (_q4_nibbles(key_rows, d, mask) * tl.load(params + d[None, :], mask=mask, other=0.0).to(tl.float32)
               + tl.load(params + kp_s2 + d[None, :], mask=mask, other=0.0).to(tl.float32))
        k_p = (_q4_nibbles(key_rows, partner, mask)
               * tl.load(params + partner[None, :], mask=mask, other=0.0).to(tl.float32)
               + tl.load(params + kp_s2 + partner[None, :], mask=mask, other=0.0).to(tl.float32))
        staged = ks_ptr + own_slot * ks_sn + offset[:, None] * ks_sb + kvh * ks_sh
        k_d = tl.where(own_mask, tl.load(staged + d[None, :], mask=own_mask, other=0.0).to(tl.float32), k_d)
        k_p = tl.where(own_mask, tl.load(staged + partner[None, :], mask=own_mask, other=0.0).to(tl.float32), k_p)
        row = tl.minimum(pos, max_position).to(tl.int64)
        cos = tl.load(cos_ptr + row[:, None] * c_s + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        sin = tl.load(sin_ptr + row[:, None] * c_s + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        k = k_d * cos.to(tl.float32) + sign[None, :] * k_p * sin.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        value_params = vp_ptr + (block * vp_sn + offset * vp_sb + kvh * vp_sh)[:, None] + value_group[None, :]
        v = (_q4_nibbles(vc_ptr + block * vc_sn + offset * vc_sb + kvh * vc_sh, d, mask)
             * tl.load(value_params, mask=mask, other=0.0).to(tl.float32)
             + tl.load(value_params + VALUE_GROUPS, mask=mask, other=0.0).to(tl.float32))
        v_exact = tl.load(vs_ptr + own_slot * vs_sn + offset[:, None] * vs_sb + kvh * vs_sh + d[None, :],
                          mask=own_mask, other=0.0).to(tl.float32)
        p_quantized = tl.where(quantized[None, :], p, 0.0)
        p_exact = tl.where(own[None, :], p, 0.0)
        acc_rotated = acc_rotated * alpha[:, None] + tl.dot(p_quantized, v, input_precision="ieee")
        acc_exact = acc_exact * alpha[:, None] + tl.dot(p_exact, v_exact, input_precision="ieee")
        m_i = m_new

    # back from the rotated basis: x = stored @ rotation^T, rotation [HEAD_DIM, HEAD_DIM] row-major
    rotation_t = tl.load(rot_ptr + d[None, :] * HEAD_DIM + d[:, None], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.dot(acc_rotated, rotation_t.to(tl.float32), input_precision="ieee") + acc_exact
    out_rows = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    _store_split_rows(out_ptr, part_o_ptr, part_ml_ptr, out_rows, m_i, l_i, b, split, heads, d, g_ok, d_ok, o_sb, o_sh,
                      GROUP, BLOCK_D, NUM_SPLITS)


def paged_decode_attention_q4_triton(query: torch.Tensor, key_codes: torch.Tensor, key_parameters: torch.Tensor,
                                     value_codes: torch.Tensor, value_parameters: torch.Tensor,
                                     key_staging: torch.Tensor, value_staging: torch.Tensor,
                                     rotation: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     own_slots: torch.Tensor, scale: float, sliding_window: int | None = None,
                                     num_splits: int | None = None) -> torch.Tensor:
    """engine_ops_ref.paged_decode_attention_q4_ref on the GPU: one program per (sequence, kv head, split of the
    context), every product in float32. num_splits None: decode_splits' rule from static sizes (a captured graph
    keeps it: small batches spread a long context over the SMs); the argument exists for tests."""
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, half_dim = key_codes.shape
    value_groups = value_parameters.shape[-1] // 2
    if (head_dim % 2 or half_dim * 2 != head_dim or heads % kv_heads or value_codes.shape != key_codes.shape
            or key_parameters.shape != (num_blocks, kv_heads, 2, head_dim)
            or value_parameters.shape[:3] != (num_blocks, block_size, kv_heads) or head_dim % value_groups
            or key_staging.shape[1:] != (block_size, kv_heads, head_dim) or value_staging.shape != key_staging.shape
            or rotation.shape != (head_dim, head_dim) or cos.shape[-1] != head_dim or sin.shape != cos.shape):
        raise QtoolError(f"paged decode attention (q4): query {tuple(query.shape)} does not fit key codes "
                         f"{tuple(key_codes.shape)}, key parameters {tuple(key_parameters.shape)}, values "
                         f"{tuple(value_codes.shape)} / {tuple(value_parameters.shape)}, staging "
                         f"{tuple(key_staging.shape)}, rotation {tuple(rotation.shape)}, cos/sin {tuple(cos.shape)}")
    if head_dim > Q4_MAX_HEAD_DIM:
        raise QtoolError(f"paged decode attention (q4): head_dim {head_dim} is over the kernel's {Q4_MAX_HEAD_DIM}")
    tensors = (query, key_codes, key_parameters, value_codes, value_parameters, key_staging, value_staging,
               cos, sin, block_tables, context_lens, own_slots)
    (query, key_codes, key_parameters, value_codes, value_parameters, key_staging, value_staging, cos, sin,
     block_tables, context_lens, own_slots) = (t if t.stride(-1) == 1 else t.contiguous() for t in tensors)
    rotation = rotation.float().contiguous()
    if cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    group = heads // kv_heads
    block_d = max(_pow2(head_dim), 16)
    block_n = 32 if block_d <= 128 else 16
    max_blocks = block_tables.shape[1]
    window = int(sliding_window) if sliding_window is not None else 0

    def launch(num_splits: int, tokens_per_split: int, part_o: torch.Tensor, part_ml: torch.Tensor) -> None:
        _q4_decode_kernel[(batch, kv_heads, num_splits)](
            query, key_codes, key_parameters, value_codes, value_parameters, key_staging, value_staging, rotation,
            cos, sin, block_tables, context_lens, own_slots, out, part_o, part_ml,
            query.stride(0), query.stride(1), key_codes.stride(0), key_codes.stride(1), key_codes.stride(2),
            key_parameters.stride(0), key_parameters.stride(1), key_parameters.stride(2),
            value_codes.stride(0), value_codes.stride(1), value_codes.stride(2),
            value_parameters.stride(0), value_parameters.stride(1), value_parameters.stride(2),
            key_staging.stride(0), key_staging.stride(1), key_staging.stride(2),
            value_staging.stride(0), value_staging.stride(1), value_staging.stride(2), cos.stride(0),
            block_tables.stride(0), out.stride(0), out.stride(1), float(scale) * LOG2E, window, cos.shape[0] - 1,
            tokens_per_split, GROUP=group, HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_SIZE=block_size,
            VALUE_GROUPS=value_groups, BLOCK_G=max(_pow2(group), 16), BLOCK_D=block_d, BLOCK_N=block_n,
            NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None, num_warps=4 if block_d <= 128 else 8,
            num_stages=2)

    return _split_k_decode(launch, out, kv_heads, max_blocks, block_size, block_d, block_n, num_splits)


# ----------------------------------------------------------------------------------------------------------------
# residual add + RMSNorm


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, normed_ptr, summed_ptr, x_s, r_s, n_s, s_s, hidden, eps, offset,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row: summed = x + r rounded to x's dtype (as torch adds), its RMSNorm in float32 times (w + offset)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * x_s + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_s + cols, mask=ok, other=0.0)
        x = _cast(x.to(tl.float32) + r.to(tl.float32), summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * s_s + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * n_s + cols, _cast(h * rstd * (w + offset), normed_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        weight_offset: float = 0.0,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """engine_ops_ref.add_rms_norm_ref on the GPU: one program per row. out: (normed, summed) buffers to write
    into (summed is not written without a residual: x is returned as it, as the reference does)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or (residual is not None and residual.shape != x.shape):
        raise QtoolError(f"add_rms_norm: x {tuple(x.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}, weight {tuple(weight.shape)} "
                         "(residual the shape of x, weight [hidden])")
    x2 = _rows(x, hidden)
    normed = _output(out and out[0], x.shape, x.dtype, x.device, "add_rms_norm")
    if residual is None:
        r2, summed = x2, x
    else:
        r2 = _rows(residual, hidden)
        summed = _output(out and out[1], x.shape, torch.promote_types(x.dtype, residual.dtype), x.device,
                         "add_rms_norm")
    s2, n2 = summed.view(-1, hidden), normed.view(-1, hidden)
    if x2.shape[0] == 0:
        return normed, summed
    block = _pow2(hidden)
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, n2, s2, x2.stride(0), r2.stride(0), n2.stride(0), s2.stride(0), hidden, float(eps),
        float(weight_offset), HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 512, 1), 16))
    return normed, summed


# ----------------------------------------------------------------------------------------------------------------
# SiLU(gate) * up


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, g_s, u_s, o_s, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    g = tl.load(g_ptr + row * g_s + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_s + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * o_s + cols, _cast(g * tl.sigmoid(g) * u, o_ptr.dtype.element_ty), mask=ok)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """engine_ops_ref.silu_mul_ref on the GPU. gate and up may be row-strided views (the halves of a fused
    gate/up projection's output); one program per (row, BLOCK columns). out: a buffer to write into."""
    if gate.shape != up.shape:
        raise QtoolError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    width = gate.shape[-1] if gate.dim() else 1
    g2, u2 = _rows(gate, width), _rows(up, width)
    out = _output(out, gate.shape, gate.dtype, gate.device, "silu_mul")
    o2 = out.view(-1, width)
    if o2.numel() == 0:
        return out
    block = min(_pow2(width), 1024)
    _silu_mul_kernel[(o2.shape[0], triton.cdiv(width, block))](
        g2, u2, o2, g2.stride(0), u2.stride(0), o2.stride(0), width, BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# RoPE + KV cache write


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, t, c_st, s_st, d, ok, HALF: tl.constexpr):
    """Token t's cos and sin rows in float32, each as its halves d and HALF + d: cos1, cos2, sin1, sin2."""
    cos1 = tl.load(cos_ptr + t * c_st + d, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * c_st + HALF + d, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * s_st + d, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * s_st + HALF + d, mask=ok, other=0.0).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def _rope_halves(src, d, ok, cos1, cos2, sin1, sin2, HALF: tl.constexpr):
    """Rotate-half RoPE of the head at src, in float32 and unrounded: its halves d and HALF + d."""
    x1 = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rope_program(q_ptr, qo_ptr, cos_ptr, sin_ptr, q_st, q_sh, qo_st, qo_sh, c_st, s_st, heads,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The start both RoPE + cache kernels share, program (token, head) over the query heads and then the kv
    heads: the token's cos/sin halves, and a query head rotated into qo. Returns t, kvh (the kv head; < 0 for a
    query head, whose work is done), d, ok and the tables, for the kv heads' own work."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_HALF)
    ok = d < HALF
    cos1, cos2, sin1, sin2 = _rope_tables(cos_ptr, sin_ptr, t, c_st, s_st, d, ok, HALF)
    if h < heads:
        q1, q2 = _rope_halves(q_ptr + t * q_st + h * q_sh, d, ok, cos1, cos2, sin1, sin2, HALF)
        dst = qo_ptr + t * qo_st + h * qo_sh
        tl.store(dst + d, _cast(q1, qo_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF + d, _cast(q2, qo_ptr.dtype.element_ty), mask=ok)
    return t, h - heads, d, ok, cos1, cos2, sin1, sin2


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, kc_ptr, vc_ptr, qo_ptr,
                       q_st, q_sh, k_st, k_sh, v_st, v_sh, c_st, s_st, kc_sn, kc_sb, kc_sh, vc_sn, vc_sb, vc_sh,
                       qo_st, qo_sh, heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    """Program (token, head): heads [0, heads) rotate a query head into qo; the rest rotate kv head
    (head - heads) of the key and store it and the value at the token's cache slot unless the slot is < 0."""
    t, kvh, d, ok, cos1, cos2, sin1, sin2 = _rope_program(q_ptr, qo_ptr, cos_ptr, sin_ptr, q_st, q_sh, qo_st, qo_sh,
                                                          c_st, s_st, heads, HALF, BLOCK_HALF)
    if kvh >= 0:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        keep = ok & ((slot + tl.zeros_like(d)) >= 0)
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k1, k2 = _rope_halves(k_ptr + t * k_st + kvh * k_sh, d, ok, cos1, cos2, sin1, sin2, HALF)
        # rounded to the key's dtype first, then the cache's (as the reference does)
        r1 = _cast(_cast(k1, k_ptr.dtype.element_ty), kc_ptr.dtype.element_ty)
        r2 = _cast(_cast(k2, k_ptr.dtype.element_ty), kc_ptr.dtype.element_ty)
        kdst = kc_ptr + block * kc_sn + offset * kc_sb + kvh * kc_sh
        tl.store(kdst + d, r1, mask=keep)
        tl.store(kdst + HALF + d, r2, mask=keep)
        vsrc = v_ptr + t * v_st + kvh * v_sh
        vdst = vc_ptr + block * vc_sn + offset * vc_sb + kvh * vc_sh
        v1 = tl.load(vsrc + d, mask=keep, other=0.0)
        v2 = tl.load(vsrc + HALF + d, mask=keep, other=0.0)
        tl.store(vdst + d, _cast(v1, vc_ptr.dtype.element_ty), mask=keep)
        tl.store(vdst + HALF + d, _cast(v2, vc_ptr.dtype.element_ty), mask=keep)


def rope_and_cache_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """engine_ops_ref.rope_and_cache_ref on the GPU in one launch: program (token, head) over the query heads
    and then the kv heads. query/key/value may be strided views of a fused QKV output (unit last stride). out:
    a buffer for the rotated query."""
    tokens, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    if (head_dim % 2 or key.shape != (tokens, kv_heads, head_dim) or value.shape != key.shape
            or cos.shape != (tokens, head_dim) or sin.shape != cos.shape or slots.shape != (tokens,)
            or key_cache.shape[-1] != head_dim or value_cache.shape != key_cache.shape):
        raise QtoolError(f"rope_and_cache: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, cos/sin {tuple(cos.shape)}, slots {tuple(slots.shape)}, cache "
                         f"{tuple(key_cache.shape)} (key/value [T, kv_heads, d], cos/sin [T, d], d even)")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise QtoolError("rope_and_cache: the caches need a unit stride in head_dim (they are written in place)")
    query, key, value, cos, sin, slots = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value, cos, sin, slots))
    out = _output(out, (tokens, heads, head_dim), query.dtype, query.device, "rope_and_cache")
    if tokens == 0:
        return out
    half = head_dim // 2
    _rope_cache_kernel[(tokens, heads + kv_heads)](
        query, key, value, cos, sin, slots, key_cache, value_cache, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), out.stride(0), out.stride(1), heads,
        HALF=half, BLOCK_HALF=_pow2(half), BLOCK_SIZE=block_size, num_warps=1 if half <= 64 else 2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# RoPE + the q4 cache's write (staging slots, value codes)


@triton.jit
def _round_half_even(x):
    """torch.round of float32 x: halves to the even neighbour."""
    low = tl.floor(x)
    fraction = x - low
    even = (low - 2.0 * tl.floor(low * 0.5)) == 0.0
    return tl.where(fraction > 0.5, low + 1.0, tl.where(fraction < 0.5, low, tl.where(even, low, low + 1.0)))


@triton.jit
def _rope_cache_q4_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kcos_ptr, ksin_ptr, rot_ptr, ks_ptr, vs_ptr,
                          vc_ptr, vp_ptr, rows_ptr, slots_ptr, qo_ptr,
                          q_st, q_sh, k_st, k_sh, v_st, v_sh, c_st, s_st, kc_st, kss_st, ks_sr, ks_sh, vs_sr, vs_sh,
                          vc_sr, vc_sh, vp_sr, vp_sh, qo_st, qo_sh, heads, tiny,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          BLOCK_D: tl.constexpr, GROUP_HALF: tl.constexpr, BLOCK_GH: tl.constexpr,
                          VALUE_GROUPS: tl.constexpr):
    """Program (token, head): heads [0, heads) rotate a query head into qo; the rest take kv head (head - heads):
    its key turned by RoPE (rounded to the key's dtype) and back by the float32 key tables, stored with the value
    at the token's staging row unless it is < 0; the value rotated by rot, quantized per group of 2 * GROUP_HALF
    channels (even and odd channels apart: they share a byte) at the token's cache slot unless it is < 0."""
    t, kvh, d, ok, cos1, cos2, sin1, sin2 = _rope_program(q_ptr, qo_ptr, cos_ptr, sin_ptr, q_st, q_sh, qo_st, qo_sh,
                                                          c_st, s_st, heads, HALF, BLOCK_HALF)
    if kvh >= 0:
        row = tl.load(rows_ptr + t).to(tl.int64)
        stage = ok & ((row + tl.zeros_like(d)) >= 0)
        k1, k2 = _rope_halves(k_ptr + t * k_st + kvh * k_sh, d, ok, cos1, cos2, sin1, sin2, HALF)
        r1 = _cast(k1, k_ptr.dtype.element_ty).to(tl.float32)
        r2 = _cast(k2, k_ptr.dtype.element_ty).to(tl.float32)
        kcos1, kcos2, ksin1, ksin2 = _rope_tables(kcos_ptr, ksin_ptr, t, kc_st, kss_st, d, ok, HALF)
        kdst = ks_ptr + row * ks_sr + kvh * ks_sh
        # back before RoPE: RoPE by the key tables with -sin (KeyRope.unrotate)
        tl.store(kdst + d, _cast(r1 * kcos1 + r2 * ksin1, ks_ptr.dtype.element_ty), mask=stage)
        tl.store(kdst + HALF + d, _cast(r2 * kcos2 - r1 * ksin2, ks_ptr.dtype.element_ty), mask=stage)
        vsrc = v_ptr + t * v_st + kvh * v_sh
        vdst = vs_ptr + row * vs_sr + kvh * vs_sh
        tl.store(vdst + d, _cast(tl.load(vsrc + d, mask=ok, other=0.0), vs_ptr.dtype.element_ty), mask=stage)
        tl.store(vdst + HALF + d, _cast(tl.load(vsrc + HALF + d, mask=ok, other=0.0), vs_ptr.dtype.element_ty),
                 mask=stage)

        slot = tl.load(slots_ptr + t).to(tl.int64)
        i = tl.arange(0, BLOCK_D)
        i_ok = i < HEAD_DIM
        value = tl.load(vsrc + i, mask=i_ok, other=0.0).to(tl.float32)
        j = tl.arange(0, BLOCK_GH)
        j_ok = j < GROUP_HALF
        keep = j_ok & ((slot + tl.zeros_like(j)) >= 0)
        pair = tl.arange(0, 2)
        keep_pair = (slot + tl.zeros_like(pair)) >= 0
        tile = i_ok[:, None] & j_ok[None, :]
        for g in tl.static_range(VALUE_GROUPS):
            even = g * 2 * GROUP_HALF + 2 * j
            rot_even = tl.load(rot_ptr + i[:, None] * HEAD_DIM + even[None, :], mask=tile, other=0.0)
            rot_odd = tl.load(rot_ptr + i[:, None] * HEAD_DIM + even[None, :] + 1, mask=tile, other=0.0)
            x_even = tl.sum(value[:, None] * rot_even, axis=0)
            x_odd = tl.sum(value[:, None] * rot_odd, axis=0)
            low = tl.minimum(tl.min(tl.where(j_ok, x_even, float("inf")), axis=0),
                             tl.min(tl.where(j_ok, x_odd, float("inf")), axis=0))
            high = tl.maximum(tl.max(tl.where(j_ok, x_even, float("-inf")), axis=0),
                              tl.max(tl.where(j_ok, x_odd, float("-inf")), axis=0))
            minimum = low.to(tl.float16)
            scale = tl.math.div_rn(high - minimum.to(tl.float32), 15.0).to(tl.float16)
            step = tl.maximum(scale.to(tl.float32), tiny)
            code_even = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x_even - minimum.to(tl.float32), step)),
                                              0.0), 15.0)
            code_odd = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x_odd - minimum.to(tl.float32), step)),
                                             0.0), 15.0)
            packed = code_even.to(tl.int32) | (code_odd.to(tl.int32) << 4)
            tl.store(vc_ptr + slot * vc_sr + kvh * vc_sh + g * GROUP_HALF + j, packed.to(tl.uint8), mask=keep)
            parameters = tl.where(pair == 0, scale.to(tl.float32), minimum.to(tl.float32)).to(tl.float16)
            tl.store(vp_ptr + slot * vp_sr + kvh * vp_sh + g + pair * VALUE_GROUPS, parameters, mask=keep_pair)


def rope_and_cache_q4_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor,
                             rotation: torch.Tensor, key_staging: torch.Tensor, value_staging: torch.Tensor,
                             value_codes: torch.Tensor, value_parameters: torch.Tensor, staging_rows: torch.Tensor,
                             slots: torch.Tensor) -> torch.Tensor:
    """engine_ops_ref.rope_and_cache_q4_ref on the GPU in one launch: program (token, head) over the query heads
    and then the kv heads (which also quantize the value: a [head_dim, group] tile of the rotation per group, so
    head_dim <= Q4_MAX_HEAD_DIM). Codes equal the reference's but where the rotated value's float32 sums (in
    another order) land on the other side of a rounding boundary."""
    tokens, heads, head_dim = query.shape
    kv_heads = key.shape[1]
    value_groups = value_parameters.shape[-1] // 2
    if (head_dim % 2 or key.shape != (tokens, kv_heads, head_dim) or value.shape != key.shape
            or cos.shape != (tokens, head_dim) or sin.shape != cos.shape or key_cos.shape != cos.shape
            or key_sin.shape != cos.shape or slots.shape != (tokens,) or staging_rows.shape != (tokens,)
            or key_staging.shape[-2:] != (kv_heads, head_dim) or value_staging.shape != key_staging.shape
            or value_codes.shape[-2:] != (kv_heads, head_dim // 2)
            or value_parameters.shape[:-1] != value_codes.shape[:-1]
            or head_dim % value_groups or rotation.shape != (head_dim, head_dim)):
        raise QtoolError(f"rope_and_cache (q4): query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, cos/sin {tuple(cos.shape)}, key tables {tuple(key_cos.shape)}, "
                         f"slots {tuple(slots.shape)}, staging {tuple(key_staging.shape)}, value codes "
                         f"{tuple(value_codes.shape)} / {tuple(value_parameters.shape)}")
    if head_dim > Q4_MAX_HEAD_DIM:
        raise QtoolError(f"rope_and_cache (q4): head_dim {head_dim} is over the kernel's {Q4_MAX_HEAD_DIM}")
    # the cache tensors are written in place: one flat row per (block, offset) or (staging slot, offset)
    flat_keys = key_staging.view(-1, kv_heads, head_dim)
    flat_values = value_staging.view(-1, kv_heads, head_dim)
    flat_codes = value_codes.view(-1, kv_heads, head_dim // 2)
    flat_parameters = value_parameters.view(-1, kv_heads, value_parameters.shape[-1])
    if any(t.stride(-1) != 1 for t in (flat_keys, flat_values, flat_codes, flat_parameters)):
        raise QtoolError("rope_and_cache (q4): the cache tensors need a unit stride in their last dim")
    query, key, value, cos, sin, key_cos, key_sin, staging_rows, slots = (
        t if t.stride(-1) == 1 else t.contiguous()
        for t in (query, key, value, cos, sin, key_cos.float(), key_sin.float(), staging_rows, slots))
    rotation = rotation.float().contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if tokens == 0:
        return out
    half = head_dim // 2
    group_half = head_dim // value_groups // 2
    _rope_cache_q4_kernel[(tokens, heads + kv_heads)](
        query, key, value, cos, sin, key_cos, key_sin, rotation, flat_keys, flat_values, flat_codes,
        flat_parameters, staging_rows, slots, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0), key_cos.stride(0), key_sin.stride(0), flat_keys.stride(0),
        flat_keys.stride(1), flat_values.stride(0), flat_values.stride(1), flat_codes.stride(0),
        flat_codes.stride(1), flat_parameters.stride(0), flat_parameters.stride(1), out.stride(0), out.stride(1),
        heads, torch.finfo(torch.float32).tiny,
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=_pow2(half), BLOCK_D=_pow2(head_dim), GROUP_HALF=group_half,
        BLOCK_GH=_pow2(group_half), VALUE_GROUPS=value_groups, num_warps=1 if head_dim <= 64 else 2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# RoPE + the q8 cache's write (codes and a scale per token and kv head, of the rotated vectors)

Q8_ROTATION_CHUNK = 32  # output channels of the rotation per step: a [head_dim, 32] float32 tile in registers


@triton.jit
def _rotated_chunk(x1, x2, rot_ptr, d, ok, c, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """Channels [c * CHUNK, (c + 1) * CHUNK) of x @ rot, x given as its float32 halves x1 (channels d) and x2
    (HALF + d): x1 @ rot[:HALF] + x2 @ rot[HALF:]."""
    j = c * CHUNK + tl.arange(0, CHUNK)
    j_ok = j < HEAD_DIM
    mask = ok[:, None] & j_ok[None, :]
    top = tl.load(rot_ptr + d[:, None] * HEAD_DIM + j[None, :], mask=mask, other=0.0)
    bottom = tl.load(rot_ptr + (HALF + d)[:, None] * HEAD_DIM + j[None, :], mask=mask, other=0.0)
    return tl.sum(x1[:, None] * top, axis=0) + tl.sum(x2[:, None] * bottom, axis=0), j, j_ok


@triton.jit
def _store_q8(x1, x2, rot_ptr, codes_ptr, scale_ptr, slot, d, ok, tiny,
              HALF: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """quantize_q8_ref of x @ rot (x as its float32 halves) into the int8 codes at codes_ptr and the float16 scale
    at scale_ptr, unless slot < 0: the absmax over the rotated channels first, then each chunk turned again and
    coded (recomputing a [d, CHUNK] product costs less than holding the whole turned vector's tile)."""
    high = 0.0
    for c in tl.static_range(CHUNKS):
        turned, j, j_ok = _rotated_chunk(x1, x2, rot_ptr, d, ok, c, HALF, HEAD_DIM, CHUNK)
        high = tl.maximum(high, tl.max(tl.where(j_ok, tl.abs(turned), 0.0), axis=0))
    scale = tl.math.div_rn(high, 127.0).to(tl.float16)
    step = tl.maximum(scale.to(tl.float32), tiny)
    for c in tl.static_range(CHUNKS):
        turned, j, j_ok = _rotated_chunk(x1, x2, rot_ptr, d, ok, c, HALF, HEAD_DIM, CHUNK)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(turned, step)), -127.0), 127.0)
        tl.store(codes_ptr + j, code.to(tl.int8), mask=j_ok & ((slot + tl.zeros_like(j)) >= 0))
    one = tl.arange(0, 1)
    tl.store(scale_ptr + one, scale + tl.zeros((1,), dtype=tl.float16), mask=(slot + tl.zeros_like(one)) >= 0)


@triton.jit
def _rope_cache_q8_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, rot_ptr, slots_ptr, kc_ptr, ksc_ptr, vc_ptr, vsc_ptr,
                          qo_ptr, q_st, q_sh, k_st, k_sh, v_st, v_sh, c_st, s_st, kc_sr, kc_sh, ksc_sr, ksc_sh,
                          vc_sr, vc_sh, vsc_sr, vsc_sh, qo_st, qo_sh, heads, tiny,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """Program (token, head): heads [0, heads) rotate a query head into qo; the rest take kv head (head - heads):
    its key turned by RoPE (rounded to the key's dtype) and its value, each turned by rot and coded at the token's
    cache slot unless it is < 0."""
    t, kvh, d, ok, cos1, cos2, sin1, sin2 = _rope_program(q_ptr, qo_ptr, cos_ptr, sin_ptr, q_st, q_sh, qo_st, qo_sh,
                                                          c_st, s_st, heads, HALF, BLOCK_HALF)
    if kvh >= 0:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        k1, k2 = _rope_halves(k_ptr + t * k_st + kvh * k_sh, d, ok, cos1, cos2, sin1, sin2, HALF)
        k1 = _cast(k1, k_ptr.dtype.element_ty).to(tl.float32)
        k2 = _cast(k2, k_ptr.dtype.element_ty).to(tl.float32)
        _store_q8(k1, k2, rot_ptr, kc_ptr + slot * kc_sr + kvh * kc_sh, ksc_ptr + slot * ksc_sr + kvh * ksc_sh, slot,
                  d, ok, tiny, HALF, HEAD_DIM, CHUNK, CHUNKS)
        vsrc = v_ptr + t * v_st + kvh * v_sh
        v1 = tl.load(vsrc + d, mask=ok, other=0.0).to(tl.float32)
        v2 = tl.load(vsrc + HALF + d, mask=ok, other=0.0).to(tl.float32)
        _store_q8(v1, v2, rot_ptr, vc_ptr + slot * vc_sr + kvh * vc_sh, vsc_ptr + slot * vsc_sr + kvh * vsc_sh, slot,
                  d, ok, tiny, HALF, HEAD_DIM, CHUNK, CHUNKS)


def rope_and_cache_q8_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, rotation: torch.Tensor, key_codes: torch.Tensor,
                             key_scales: torch.Tensor, value_codes: torch.Tensor, value_scales: torch.Tensor,
                             slots: torch.Tensor) -> torch.Tensor:
    """engine_ops_ref.rope_and_cache_q8_ref on the GPU in one launch: program (token, head) over the query heads
    and then the kv heads, which turn their key and value by the rotation chunk by chunk. Codes equal the
    reference's but where a turned channel's float32 sum (in another order) lands on the other side of a rounding
    boundary."""
    tokens, heads, head_dim = query.shape
    kv_heads = key.shape[1]
    if (head_dim % 2 or key.shape != (tokens, kv_heads, head_dim) or value.shape != key.shape
            or cos.shape != (tokens, head_dim) or sin.shape != cos.shape or slots.shape != (tokens,)
            or key_codes.shape[-2:] != (kv_heads, head_dim) or value_codes.shape != key_codes.shape
            or key_scales.shape != (*key_codes.shape[:-1], 1) or value_scales.shape != key_scales.shape
            or rotation.shape != (head_dim, head_dim)):
        raise QtoolError(f"rope_and_cache (q8): query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, cos/sin {tuple(cos.shape)}, slots {tuple(slots.shape)}, codes "
                         f"{tuple(key_codes.shape)}, scales {tuple(key_scales.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise QtoolError(f"rope_and_cache (q8): head_dim {head_dim} is over the kernel's {MAX_HEAD_DIM}")
    flat = [t.view(-1, kv_heads, t.shape[-1]) for t in (key_codes, key_scales, value_codes, value_scales)]
    if any(t.stride(-1) != 1 for t in flat):
        raise QtoolError("rope_and_cache (q8): the cache tensors need a unit stride in their last dim")
    query, key, value, cos, sin, slots = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value, cos, sin, slots))
    rotation = rotation.float().contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if tokens == 0:
        return out
    half = head_dim // 2
    block_d = _pow2(head_dim)
    chunk = min(Q8_ROTATION_CHUNK, block_d)  # the chunks cover block_d >= head_dim output channels
    strides = [stride for t in flat for stride in (t.stride(0), t.stride(1))]
    _rope_cache_q8_kernel[(tokens, heads + kv_heads)](
        query, key, value, cos, sin, rotation, slots, *flat, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0), *strides, out.stride(0), out.stride(1), heads, torch.finfo(torch.float32).tiny,
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=_pow2(half), CHUNK=chunk, CHUNKS=block_d // chunk,
        num_warps=1 if head_dim <= 64 else 2)
    return out


def triton_interpreted() -> bool:
    """True when these kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_paged_decode_kernel, JITFunction)
