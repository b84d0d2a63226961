"""Torch references of the engine's per-token operations (the ground truth the Triton versions in
engine_ops_triton.py are tested against, and the path on the CPU): paged decode attention, residual add + RMSNorm,
SiLU times up, and RoPE fused with the KV cache write. Each works on whole tensors (no Python loop over
sequences), so a decode step built from them can be captured as a CUDA graph."""

from __future__ import annotations

import torch

Q4_VALUE_GROUP = 64  # a q4 value's channels per scale and minimum (the whole head where 64 does not divide it)
_TINY = torch.finfo(torch.float32).tiny  # a zero scale (an all-equal group) divides by this instead: codes 0

def paged_decode_attention_ref(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence: query [B, heads, d] attends to its sequence's first context_lens[b] cached
    tokens (its own K/V already written at position context_lens[b] - 1), read through block_tables [B, max_blocks]
    (int) from key_cache/value_cache [num_blocks, block_size, kv_heads, d]. Query head h reads kv head
    h // (heads // kv_heads). With a sliding window only the last `sliding_window` positions count (the query's
    own included). A row with context_lens 0 (a padded slot of a captured batch) gives zeros. Scores and softmax
    in float32; out [B, heads, d] in query's dtype."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    max_context = block_tables.shape[1] * block_size
    positions = torch.arange(max_context, device=query.device)
    blocks = block_tables.long()[:, positions // block_size]  # [B, max_context]
    slots = blocks * block_size + positions % block_size
    keys = key_cache.reshape(-1, kv_heads, head_dim)[slots].float()  # [B, ctx, kv_heads, d]
    values = value_cache.reshape(-1, kv_heads, head_dim)[slots].float()
    return _attend_gathered(query, keys, values, context_lens, scale, sliding_window)


def _attend_gathered(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, sliding_window: int | None) -> torch.Tensor:
    """query [B, heads, d] against each sequence's gathered context keys/values [B, ctx, kv_heads, d] (float32,
    position p at index p), the first context_lens[b] positions (the last sliding_window of them) allowed; scores
    and softmax in float32; out [B, heads, d] in query's dtype (zeros for a row without context)."""
    batch, heads, head_dim = query.shape
    kv_heads = keys.shape[2]
    positions = torch.arange(keys.shape[1], device=query.device)
    group = heads // kv_heads
    q = query.float().view(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bkgd,bckd->bkgc", q, keys) * scale
    lens = context_lens.long().view(batch, 1)
    allowed = positions.view(1, -1) < lens
    if sliding_window is not None:
        allowed &= positions.view(1, -1) >= lens - sliding_window
    scores = scores.masked_fill(~allowed.view(batch, 1, 1, -1), float("-inf"))
    weights = torch.nan_to_num(scores.softmax(dim=-1))  # an empty row (context 0) is all -inf: NaN -> 0
    out = torch.einsum("bkgc,bckd->bkgd", weights, values)
    return out.reshape(batch, heads, head_dim).to(query.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """summed = x + residual (x alone when residual is None), then RMSNorm of summed over the last dim with
    weight (+ weight_offset: Gemma's norms scale by 1 + w). The norm is computed in float32 and cast to x's dtype
    once at the end. Returns (normed, summed); summed is the next residual."""
    summed = x if residual is None else x + residual
    hidden = summed.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (hidden * (weight.float() + weight_offset)).to(x.dtype), summed


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise (the gated MLP's activation), in float32, cast to gate's dtype."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def rope_and_cache_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       slots: torch.Tensor) -> torch.Tensor:
    """Rotate query [T, heads, d] and key [T, kv_heads, d] by cos/sin [T, d] (the rotate-half layout), store the
    rotated key and value [T, kv_heads, d] at their flat cache slots [T] (block * block_size + offset; a slot < 0
    is a padded row and is not stored), and return the rotated query."""
    kv_heads, head_dim = key_cache.shape[-2:]
    keep = slots >= 0
    flat_keys = key_cache.view(-1, kv_heads, head_dim)
    flat_values = value_cache.view(-1, kv_heads, head_dim)
    flat_keys[slots[keep]] = _rope_rows(key, cos, sin)[keep].to(key_cache.dtype)
    flat_values[slots[keep]] = value[keep].to(value_cache.dtype)
    return _rope_rows(query, cos, sin)


def _rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] turned by RoPE (rotate-half pairs) with cos/sin [T, d], in float32, rounded to x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos.float().unsqueeze(1) + rotated.float() * sin.float().unsqueeze(1)).to(x.dtype)


def quantize_q4_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] (d even) -> (packed uint8 [..., d / 2], float16 [..., 2 * groups]: each group's scale, then each
    group's minimum), groups of 64 along d (the whole of d when 64 does not divide it): x ~ code * scale +
    minimum, code in [0, 15] (the q4 cache's values: runtime/engine/kv_quant.quantize_q4)."""
    head_dim = x.shape[-1]
    group = Q4_VALUE_GROUP if head_dim % Q4_VALUE_GROUP == 0 else head_dim
    grouped = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    minimum = grouped.amin(dim=-1, keepdim=True).to(torch.float16)
    scales = ((grouped.amax(dim=-1, keepdim=True) - minimum.float()) / 15).to(torch.float16)
    codes = ((grouped - minimum.float()) / scales.float().clamp_min(_TINY)).round().clamp(0, 15)
    nibbles = codes.to(torch.uint8).reshape(*x.shape[:-1], head_dim // 2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4), torch.cat((scales, minimum), dim=-2).squeeze(-1)


def rope_and_cache_q4_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor, rotation: torch.Tensor,
                          key_staging: torch.Tensor, value_staging: torch.Tensor, value_codes: torch.Tensor,
                          value_parameters: torch.Tensor, staging_rows: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
    """rope_and_cache_ref for the engine's q4 cache layout (runtime/engine/kv_quant.Q4CacheLayer), one token per
    row of query [T, heads, d], key and value [T, kv_heads, d]:
    - the key, turned by RoPE with cos/sin [T, d] and rounded to key's dtype (as rope_and_cache does), then turned
      back with key_cos/key_sin [T, d] (float32: the layer's KeyRope at the same positions), is stored before RoPE
      in key_staging, and the value as it is in value_staging ([slots, block_size, kv_heads, d]), at the flat
      staging rows staging_rows [T] (staging slot * block_size + offset; < 0: not stored);
    - the value, rotated by rotation [d, d] (stored = value @ rotation), is quantized per group (quantize_q4_ref)
      into value_codes [num_blocks, block_size, kv_heads, d / 2] and value_parameters [num_blocks, block_size,
      kv_heads, 2 * groups] at its flat cache slot slots [T] (< 0: a padded row, not stored).
    Returns the rotated query. Keys' codes are not written here: a block's keys are quantized when it is full."""
    kv_heads, head_dim = key.shape[-2:]
    rotated_keys = _rope_rows(key, cos, sin)
    before_rope = _rope_rows(rotated_keys.float(), key_cos, -key_sin)  # float32, as KeyRope.unrotate
    staged = staging_rows >= 0
    rows = staging_rows[staged]
    key_staging.view(-1, kv_heads, head_dim)[rows] = before_rope[staged].to(key_staging.dtype)
    value_staging.view(-1, kv_heads, head_dim)[rows] = value[staged].to(value_staging.dtype)
    kept = slots >= 0
    codes, parameters = quantize_q4_ref(value[kept].float() @ rotation.float())
    value_codes.view(-1, *value_codes.shape[2:])[slots[kept]] = codes
    value_parameters.view(-1, *value_parameters.shape[2:])[slots[kept]] = parameters
    return _rope_rows(query, cos, sin)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., d / 2] -> float32 [..., d]: element 2j in the low nibble, 2j + 1 in the high one."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1).float()


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def paged_decode_attention_q4_ref(query: torch.Tensor, key_codes: torch.Tensor, key_parameters: torch.Tensor,
                                  value_codes: torch.Tensor, value_parameters: torch.Tensor,
                                  key_staging: torch.Tensor, value_staging: torch.Tensor, rotation: torch.Tensor,
                                  cos: torch.Tensor, sin: torch.Tensor, block_tables: torch.Tensor,
                                  context_lens: torch.Tensor, own_slots: torch.Tensor, scale: float,
                                  sliding_window: int | None = None) -> torch.Tensor:
    """paged_decode_attention_ref over the engine's q4 cache layout (runtime/engine/kv_quant.Q4CacheLayer), one
    query token per sequence. A sequence's own block (the one holding its last position, context_lens[b] - 1) is
    read exact from staging slot own_slots[b] (key_staging/value_staging [slots, block_size, kv_heads, d]: keys
    before RoPE, values as written); every earlier block (and the own block where own_slots[b] < 0) from codes:
    - keys [num_blocks, block_size, kv_heads, d / 2] uint8, before RoPE: code * scale + minimum, key_parameters
      [num_blocks, kv_heads, 2, d] float16 (each channel's scale, then its minimum over the block);
    - values [num_blocks, block_size, kv_heads, d / 2] uint8 of the rotated vectors: code * scale + minimum per
      group of d / groups channels, value_parameters [num_blocks, block_size, kv_heads, 2 * groups] float16 (the
      groups' scales, then their minima), rotated back by rotation [d, d] (stored = value @ rotation).
    Keys are turned by RoPE (rotate-half pairs) with cos/sin [max_positions, d] at their positions. Scores,
    softmax and sums in float32; out [B, heads, d] in query's dtype."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = key_codes.shape[1], key_codes.shape[2]
    max_context = block_tables.shape[1] * block_size
    positions = torch.arange(max_context, device=query.device)
    blocks = block_tables.long()[:, positions // block_size]  # [B, ctx]
    offsets = (positions % block_size).expand(batch, -1)
    keys = _nibbles(key_codes[blocks, offsets])  # [B, ctx, kv_heads, d]
    parameters = key_parameters[blocks].float()  # [B, ctx, kv_heads, 2, d]
    keys = keys * parameters[..., 0, :] + parameters[..., 1, :]
    value_params = value_parameters[blocks, offsets].float()  # [B, ctx, kv_heads, 2 * groups]
    groups = value_params.shape[-1] // 2
    grouped = _nibbles(value_codes[blocks, offsets]).reshape(batch, max_context, kv_heads, groups, -1)
    values = grouped * value_params[..., :groups, None] + value_params[..., groups:, None]
    values = values.reshape(batch, max_context, kv_heads, head_dim) @ rotation.float().T
    lens = context_lens.long().view(batch, 1)
    own_start = ((lens - 1).clamp_min(0) // block_size) * block_size
    own = (positions.view(1, -1) >= own_start) & (own_slots.long().view(batch, 1) >= 0)
    slots = own_slots.long().clamp_min(0).view(batch, 1).expand(-1, max_context)
    keys = torch.where(own[..., None, None], key_staging[slots, offsets].float(), keys)
    values = torch.where(own[..., None, None], value_staging[slots, offsets].float(), values)
    rows = positions.clamp(max=cos.shape[0] - 1)  # positions past the table are masked below
    table_cos, table_sin = cos.float()[rows], sin.float()[rows]  # [ctx, d]
    keys = _rope_half(keys, table_cos[None, :, None, :], table_sin[None, :, None, :])
    return _attend_gathered(query, keys, values, context_lens, scale, sliding_window)


def quantize_q8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (codes int8 [..., d], scales float16 [..., 1]): symmetric absmax per vector, x ~ code *
    scale, code in [-127, 127] (the q8 cache's layout: runtime/engine/kv_quant.quantize_q8)."""
    x = x.float()
    scales = (x.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16)
    codes = (x / scales.float().clamp_min(_TINY)).round().clamp(-127, 127)
    return codes.to(torch.int8), scales


def rope_and_cache_q8_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, rotation: torch.Tensor, key_codes: torch.Tensor, key_scales: torch.Tensor,
                          value_codes: torch.Tensor, value_scales: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """rope_and_cache_ref for the engine's q8 cache layout (runtime/engine/kv_quant.QuantizedCacheLayer), one
    token per row of query [T, heads, d], key and value [T, kv_heads, d]: the key turned by RoPE with cos/sin [T, d]
    and rounded to key's dtype (as rope_and_cache does), and the value, each rotated by rotation [d, d] (stored =
    x @ rotation) and quantized per (token, kv head) (quantize_q8_ref) into codes [num_blocks, block_size, kv_heads,
    d] int8 and scales [num_blocks, block_size, kv_heads, 1] float16 at the flat cache slot slots [T] (< 0: a
    padded row, not stored). Returns the rotated query."""
    kept = slots >= 0
    rotation = rotation.float()
    for x, codes_out, scales_out in ((_rope_rows(key, cos, sin), key_codes, key_scales),
                                     (value, value_codes, value_scales)):
        codes, scales = quantize_q8_ref(x[kept].float() @ rotation)
        codes_out.view(-1, *codes_out.shape[2:])[slots[kept]] = codes
        scales_out.view(-1, *scales_out.shape[2:])[slots[kept]] = scales
    return _rope_rows(query, cos, sin)


def paged_decode_attention_q8_ref(query: torch.Tensor, key_codes: torch.Tensor, key_scales: torch.Tensor,
                                  value_codes: torch.Tensor, value_scales: torch.Tensor, rotation: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None) -> torch.Tensor:
    """paged_decode_attention_ref over the engine's q8 cache layout (runtime/engine/kv_quant.QuantizedCacheLayer):
    keys and values read as code * scale (codes [num_blocks, block_size, kv_heads, d] int8, scales [num_blocks,
    block_size, kv_heads, 1] float16) and rotated back by rotation [d, d] (stored = x @ rotation). Scores, softmax
    and sums in float32; out [B, heads, d] in query's dtype."""
    block_size = key_codes.shape[1]
    positions = torch.arange(block_tables.shape[1] * block_size, device=query.device)
    blocks = block_tables.long()[:, positions // block_size]  # [B, ctx]
    offsets = (positions % block_size).expand(len(blocks), -1)
    back = rotation.float().T

    def read(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # [B, ctx, kv_heads, d] float32
        return (codes[blocks, offsets].float() * scales[blocks, offsets].float()) @ back

    return _attend_gathered(query, read(key_codes, key_scales), read(value_codes, value_scales), context_lens, scale,
                            sliding_window)
