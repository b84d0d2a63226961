"""The paged KV cache tensors (per layer: [num_blocks, block_size, kv_heads, head_dim]) and the torch reference
attention over them: each sequence's keys gathered through its block table, causal within the new chunk, GQA.
A cache is float (KVCache: plain tensors in its dtype) or quantized (kv_quant.QuantizedKVCache: codes and scales);
write_kv and paged_attention take either layer kind."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.runtime.engine.kv_quant import Q4Part, QuantizedCacheLayer, QuantizedKVCache
from qtool.runtime.kv_cache_names import FLOAT_KV_CACHES, QUANTIZED_KV_CACHES, check_kv_cache

FLOAT_KV_DTYPES = dict(zip(FLOAT_KV_CACHES, (torch.float16, torch.bfloat16)))


@dataclass
class KVCache:
    key: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, head_dim]
    value: torch.Tensor
    is_quantized = False  # the fast float paths (Triton, CUDA graphs) read it directly
    kind = None  # a quantized cache names its kind (q8, q4); a float one is its tensors' dtype

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def block_size(self) -> int:
        return self.key.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.key.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated tensors."""
        return self.key.nbytes + self.value.nbytes

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key[index], self.value[index]


def allocate_kv_cache(kind: str, model_dtype: torch.dtype, num_layers: int, num_blocks: int, block_size: int,
                      kv_heads: int, head_dim: int, device: torch.device | str,
                      staging_slots: int = 1) -> KVCache | QuantizedKVCache:
    """The cache of a kind of KV_CACHE_KINDS: auto (model_dtype), fp16, bf16 (float tensors), q8 or q4 (whose keys
    keep staging_slots blocks being filled as written, in model_dtype: give it the running sequences at most)."""
    if check_kv_cache(kind) in QUANTIZED_KV_CACHES:
        return QuantizedKVCache.allocate(kind, num_layers, num_blocks, block_size, kv_heads, head_dim, device,
                                         staging_slots, model_dtype)
    return KVCache.allocate(num_layers, num_blocks, block_size, kv_heads, head_dim,
                            FLOAT_KV_DTYPES.get(kind, model_dtype), device)


def kv_cache_bytes_per_block(kind: str, model_dtype: torch.dtype, num_layers: int, block_size: int, kv_heads: int,
                             head_dim: int) -> int:
    """Bytes one block takes in allocate_kv_cache's cache of that kind (codes and scales for the quantized kinds)."""
    if check_kv_cache(kind) in QUANTIZED_KV_CACHES:
        return QuantizedKVCache.bytes_per_block(kind, num_layers, block_size, kv_heads, head_dim)
    return KVCache.bytes_per_block(num_layers, block_size, kv_heads, head_dim, FLOAT_KV_DTYPES.get(kind, model_dtype))


def kv_cache_fixed_bytes(kind: str, model_dtype: torch.dtype, num_layers: int, block_size: int, kv_heads: int,
                         head_dim: int, staging_slots: int) -> int:
    """Bytes allocate_kv_cache's cache takes besides its blocks: a q4 cache's staging slots of keys and values
    (else none)."""
    if check_kv_cache(kind) in QUANTIZED_KV_CACHES:
        return QuantizedKVCache.staging_bytes(kind, num_layers, block_size, kv_heads, head_dim, staging_slots,
                                              model_dtype)
    return 0


# one layer's keys or values, [num_blocks, block_size, kv_heads, d]
CacheLayer = torch.Tensor | QuantizedCacheLayer | Q4Part


def reads_own_block_exact(cache: CacheLayer) -> bool:
    """Whether a query reads its own block's keys/values exact and earlier blocks as stored (a q4 cache)."""
    return isinstance(cache, Q4Part)


def read_kv(cache: CacheLayer, slots: torch.Tensor, dtype: torch.dtype,
            positions: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """The keys (or values) [len(slots), kv_heads, head_dim] at flat cache slots, in dtype. positions [len(slots)]:
    the tokens' positions in their sequences, which q4 keys stored before RoPE need to be rotated back. exact (a
    q4 cache): the blocks the last write touched as written, not as stored (a query's own block)."""
    if isinstance(cache, Q4Part):
        return cache.read(slots, dtype, positions, exact)
    if isinstance(cache, QuantizedCacheLayer):
        return cache.read(slots, dtype)
    kv_heads, head_dim = cache.shape[-2:]
    return cache.view(-1, kv_heads, head_dim)[slots].to(dtype)


@dataclass
class AttentionBatch:
    """Where each sequence's new tokens sit in the flattened batch and in the cache. Sequence i's queries are rows
    query_starts[i] : query_starts[i] + query_lens[i]; they are its last query_lens[i] of context_lens[i] tokens."""

    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]  # tokens with K/V in the cache once this step's are written
    block_tables: list[list[int]]
    slots: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    positions: torch.Tensor | None = None  # [T] position of each new token in its sequence

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int,
              device: torch.device | str = "cpu") -> "AttentionBatch":
        starts, slots, positions, offset = [], [], [], 0
        for table, context, count in zip(block_tables, context_lens, query_lens):
            starts.append(offset)
            offset += count
            slots.append(cache_slots(table, range(context - count, context), block_size))
            positions.append(torch.arange(context - count, context))
        flat = lambda parts: (torch.cat(parts).to(device) if parts  # noqa: E731
                              else torch.empty(0, dtype=torch.long, device=device))
        return cls(starts, list(query_lens), list(context_lens), block_tables, flat(slots), flat(positions))


def cache_slots(block_table: list[int], positions, block_size: int) -> torch.Tensor:
    """The flat cache slot of each position of a sequence, through its block table."""
    positions = torch.as_tensor(list(positions), dtype=torch.long)
    table = torch.as_tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


def write_kv(key_cache: CacheLayer, value_cache: CacheLayer, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, positions: torch.Tensor | None = None) -> None:
    """Store new keys/values [T, kv_heads, head_dim] at their slots (converted to the cache's dtype, or quantized).
    positions [T]: the tokens' positions, which q4 keys stored before RoPE need."""
    if isinstance(key_cache, Q4Part):
        key_cache.layer.write(slots, key, value, positions)
        return
    if isinstance(key_cache, QuantizedCacheLayer):
        key_cache.write(slots, key)
        value_cache.write(slots, value)
        return
    kv_heads, head_dim = key_cache.shape[-2:]
    key_cache.view(-1, kv_heads, head_dim)[slots] = key.to(key_cache.dtype)
    value_cache.view(-1, kv_heads, head_dim)[slots] = value.to(value_cache.dtype)


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit softcapping, softcap * tanh(scores / softcap), applied before the mask."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def paged_attention(query: torch.Tensor, key_cache: CacheLayer, value_cache: CacheLayer, batch: AttentionBatch,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(softcap(q k^T * scale) + mask) v for every sequence of a ragged batch, q [T, heads, head_dim] -> same
    shape. A query at position p sees the keys at positions j <= p, and with a sliding window only j > p - window
    (the window counts the query itself, as transformers' masks do). Scores and softmax are float32. With a q4
    cache a query reads its own block's keys and values exact and earlier blocks as stored (reads_own_block_exact),
    so a chunk of queries sees what each would see decoded alone."""
    heads = query.shape[1]
    kv_heads, block_size = key_cache.shape[-2], key_cache.shape[1]
    group = heads // kv_heads
    own_exact = reads_own_block_exact(key_cache)
    out = torch.empty_like(query)

    def per_head(x: torch.Tensor) -> torch.Tensor:  # [n, kv_heads, d] -> [heads, n, d]: query head h reads h // group
        return x.repeat_interleave(group, dim=1).transpose(0, 1)

    for start, count, context, table in zip(batch.query_starts, batch.query_lens, batch.context_lens,
                                            batch.block_tables):
        # keys from the first query's window on: blocks before it may be released (block_manager.RELEASED)
        first = 0 if sliding_window is None else max(0, context - count - sliding_window + 1)
        slots = cache_slots(table, range(first, context), block_size).to(query.device)
        positions = torch.arange(first, context, device=query.device)
        keys = per_head(read_kv(key_cache, slots, query.dtype, positions))
        values = per_head(read_kv(value_cache, slots, query.dtype))
        q = query[start : start + count].transpose(0, 1)  # [heads, count, d]
        scores = torch.matmul(q.float(), keys.float().transpose(1, 2)) * scale
        q_pos = torch.arange(context - count, context, device=query.device).unsqueeze(1)
        k_pos = positions.unsqueeze(0)
        if own_exact:  # the queries' own blocks, from the first query's block on: exact keys
            tail = max(first, (context - count) // block_size * block_size) - first
            own = (k_pos[:, tail:] // block_size) == (q_pos // block_size)
            exact_keys = per_head(read_kv(key_cache, slots[tail:], query.dtype, positions[tail:], exact=True))
            exact_scores = torch.matmul(q.float(), exact_keys.float().transpose(1, 2)) * scale
            scores[..., tail:] = torch.where(own, exact_scores, scores[..., tail:])
        scores = softcapped(scores, softcap)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(query.dtype)
        if own_exact:
            exact_values = per_head(read_kv(value_cache, slots[tail:], query.dtype, exact=True))
            own_weights = weights[..., tail:] * own
            weights = torch.cat((weights[..., :tail], weights[..., tail:] * ~own), dim=-1)
            attended = torch.matmul(weights, values) + torch.matmul(own_weights, exact_values)
        else:
            attended = torch.matmul(weights, values)
        out[start : start + count] = attended.transpose(0, 1)
    return out
