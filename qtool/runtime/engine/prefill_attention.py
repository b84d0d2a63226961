"""Attention of a ragged step (prefill chunks and decodes mixed) on the GPU, with attention.paged_attention's
signature and semantics: torch's flash varlen attention over each sequence's context gathered from the paged cache
(one kernel for the whole batch; fp16/bf16), or, where it cannot run (float32, no flash kernel), torch's
scaled_dot_product_attention per sequence. The CPU keeps attention.paged_attention, the reference. Contexts are
gathered through attention.read_kv, so a q8 cache's keys and values arrive dequantized; a q4 cache (a query
reads its own block exact) goes to attention.paged_attention on the same device."""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch

from qtool.runtime.engine.attention import (AttentionBatch, CacheLayer, paged_attention, read_kv,
                                           reads_own_block_exact, softcapped)

logger = logging.getLogger(__name__)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GatheredBatch:
    """One step's layout for attention over gathered contexts, the same for every layer."""

    context_slots: torch.Tensor  # [sum of context lens] flat cache slot of every context token, sequence after sequence
    context_positions: torch.Tensor  # [sum of context lens] each context token's position in its sequence
    cu_queries: torch.Tensor  # [N + 1] int32 offsets of each sequence's queries
    cu_contexts: torch.Tensor  # [N + 1] int32 offsets of each sequence's context in context_slots
    max_query: int
    max_context: int

    @classmethod
    def build(cls, batch: AttentionBatch, block_size: int, device: torch.device) -> "GatheredBatch":
        lens = torch.tensor(batch.context_lens, dtype=torch.long)
        total = int(lens.sum())
        width = max(len(table) for table in batch.block_tables)
        tables = torch.zeros(len(lens), width, dtype=torch.long)
        for row, table in enumerate(batch.block_tables):
            tables[row, : len(table)] = torch.tensor(table, dtype=torch.long)
        starts = torch.cumsum(lens, 0) - lens
        sequence = torch.repeat_interleave(torch.arange(len(lens)), lens)
        position = torch.arange(total) - starts[sequence]
        slots = tables[sequence, position // block_size] * block_size + position % block_size
        offsets = lambda counts: torch.tensor([0, *counts]).cumsum(0).to(torch.int32)  # noqa: E731
        return cls(slots.to(device), position.to(device), offsets(batch.query_lens).to(device), offsets(batch.context_lens).to(device),
                   max(batch.query_lens), max(batch.context_lens))


def sdpa_attention(query: torch.Tensor, key_cache: CacheLayer, value_cache: CacheLayer, batch: AttentionBatch,
                   scale: float, sliding_window: int | None = None,
                   gathered: GatheredBatch | None = None, softcap: float | None = None) -> torch.Tensor:
    """paged_attention through scaled_dot_product_attention, one call per sequence (any device and dtype). With a
    softcap (which SDPA cannot apply) the scores are formed explicitly, in float32, as paged_attention does."""
    gathered = gathered or GatheredBatch.build(batch, key_cache.shape[1], query.device)
    keys = read_kv(key_cache, gathered.context_slots, query.dtype, gathered.context_positions)  # q8/q4: dequantized
    values = read_kv(value_cache, gathered.context_slots, query.dtype)
    out = torch.empty_like(query)
    context_start = 0
    for start, count, context in zip(batch.query_starts, batch.query_lens, batch.context_lens):
        q_pos = torch.arange(context - count, context, device=query.device).unsqueeze(1)
        k_pos = torch.arange(context, device=query.device).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        k = keys[context_start : context_start + context].transpose(0, 1)  # [kv_heads, context, d]
        v = values[context_start : context_start + context].transpose(0, 1)
        q = query[start : start + count].transpose(0, 1)
        if softcap is None:
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                                                        enable_gqa=True)
        else:
            group = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            scores = softcapped(torch.matmul(q.float(), k.float().transpose(1, 2)) * scale, softcap)
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(q.dtype)
            attended = torch.matmul(weights, v)
        out[start : start + count] = attended.transpose(0, 1)
        context_start += context
    return out


def varlen_attention(query: torch.Tensor, key_cache: CacheLayer, value_cache: CacheLayer, scale: float,
                     sliding_window: int | None, gathered: GatheredBatch) -> torch.Tensor:
    """paged_attention through torch's flash varlen kernel (CUDA, fp16/bf16): causal from the bottom right (a
    sequence's queries are the last of its context), the window counting the query itself."""
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

    kv_heads = key_cache.shape[-2]
    keys = read_kv(key_cache, gathered.context_slots, query.dtype, gathered.context_positions)  # q8/q4: dequantized
    values = read_kv(value_cache, gathered.context_slots, query.dtype)
    options = dict(varlen_options(varlen_attn, sliding_window) or {})
    if not options:
        raise TypeError("this torch's varlen_attn has no window_size for a sliding window")
    if "enable_gqa" not in options and kv_heads != query.shape[1]:  # before torch's enable_gqa: whole heads
        keys = keys.repeat_interleave(query.shape[1] // kv_heads, dim=1)
        values = values.repeat_interleave(query.shape[1] // kv_heads, dim=1)
    return varlen_attn(query.contiguous(), keys, values, gathered.cu_queries, gathered.cu_contexts,
                       gathered.max_query, gathered.max_context, scale=scale, **options)


@functools.lru_cache(maxsize=None)  # read once per window, not per layer and step
def varlen_options(varlen_attn, sliding_window: int | None) -> dict | None:
    """The keyword arguments for causal (windowed) GQA attention in this torch's varlen_attn (its arguments
    changed across torch versions: is_causal, then window_size; enable_gqa later), or None when it cannot."""
    parameters = inspect.signature(varlen_attn).parameters
    options: dict = {"enable_gqa": True} if "enable_gqa" in parameters else {}
    if "window_size" in parameters:
        options["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    elif sliding_window is None and "is_causal" in parameters:
        options["is_causal"] = True  # bottom-right aligned in flash attention 2
    else:
        return None
    return options


class PrefillAttention:
    """paged_attention's drop-in for the GPU. The step's gathered layout is built on the first layer's call and
    reused by the others (kept for the batch object it was built for)."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.use_varlen = True
        self._layout: tuple[AttentionBatch, GatheredBatch] | None = None

    def _gathered(self, batch: AttentionBatch) -> GatheredBatch:
        if self._layout is None or self._layout[0] is not batch:
            self._layout = (batch, GatheredBatch.build(batch, self.block_size, self.device))
        return self._layout[1]

    def __call__(self, query: torch.Tensor, key_cache: CacheLayer, value_cache: CacheLayer,
                 batch: AttentionBatch, scale: float, sliding_window: int | None = None,
                 softcap: float | None = None) -> torch.Tensor:
        if reads_own_block_exact(key_cache):
            # a q4 cache: each query's own block exact, earlier blocks as stored, which neither the varlen kernel
            # nor SDPA takes (two key sets per query): the torch reference, per sequence, on this device
            return paged_attention(query, key_cache, value_cache, batch, scale, sliding_window, softcap)
        gathered = self._gathered(batch)
        # the varlen kernel has no logit softcap (Gemma 2): those layers take the per-sequence path
        if self.use_varlen and softcap is None and query.is_cuda and query.dtype in FLASH_DTYPES:
            try:
                return varlen_attention(query, key_cache, value_cache, scale, sliding_window, gathered)
            except (ImportError, TypeError, RuntimeError) as exc:  # an older torch, or no flash kernel for this
                # GPU or head size: the SDPA path from now on
                self.use_varlen = False
                logger.info("engine: torch's varlen flash attention cannot run here (%s); prefill attention "
                            "through scaled_dot_product_attention per sequence", str(exc).splitlines()[0][:200])
        return sdpa_attention(query, key_cache, value_cache, batch, scale, sliding_window, gathered, softcap)
