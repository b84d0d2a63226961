"""The paged attention against plain causal attention on the same q/k/v: ragged chunks of several sequences, block
tables in scrambled order, GQA, sliding windows, Gemma 2's logit softcap; and the slots new tokens are written to."""

from __future__ import annotations

import pytest
import torch

from qtool.runtime.engine.attention import AttentionBatch, KVCache, cache_slots, paged_attention, write_kv

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4


def dense_attention(q, k, v, scale, window=None, softcap=None):
    """Causal attention of one sequence's last q.shape[0] positions over all of k/v [ctx, kv_heads, d] (float64
    scores written out where a softcap applies: cap * tanh(scores / cap) before the mask)."""
    context, count = k.shape[0], q.shape[0]
    group = HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_pos = torch.arange(context - count, context).unsqueeze(1)
    k_pos = torch.arange(context).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
        return out.transpose(0, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (None, 0.7), (3, 0.7)])
def test_paged_attention_equals_dense_causal_attention(window, softcap):
    gen = torch.Generator().manual_seed(0)
    # (context length, new tokens): a whole prompt, a middle chunk, a decode, a prompt ending on a block edge
    shapes = [(7, 7), (10, 5), (9, 1), (8, 8)]
    num_blocks = 16
    order = torch.randperm(num_blocks, generator=gen).tolist()  # block tables far from 0, 1, 2, ...
    tables, keys, values = [], [], []
    cache = KVCache.allocate(1, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    key_cache, value_cache = cache.layer(0)
    for context, _ in shapes:
        tables.append([order.pop() for _ in range(-(-context // BLOCK))])
        keys.append(torch.randn(context, KV_HEADS, HEAD_DIM, generator=gen))
        values.append(torch.randn(context, KV_HEADS, HEAD_DIM, generator=gen))
        # the tokens before this step's chunk are already in the cache
        slots = cache_slots(tables[-1], range(context), BLOCK)
        write_kv(key_cache, value_cache, slots, keys[-1], values[-1])
    queries = [torch.randn(count, HEADS, HEAD_DIM, generator=gen) for _, count in shapes]
    batch = AttentionBatch.build(tables, [c for c, _ in shapes], [n for _, n in shapes], BLOCK)
    out = paged_attention(torch.cat(queries), key_cache, value_cache, batch, scale=0.3, sliding_window=window,
                          softcap=softcap)
    expected = torch.cat([dense_attention(q, k, v, 0.3, window, softcap) for q, k, v in zip(queries, keys, values)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if softcap is not None:  # the cap changes the result at these score sizes
        uncapped = paged_attention(torch.cat(queries), key_cache, value_cache, batch, scale=0.3, sliding_window=window)
        assert (uncapped - out).abs().max() > 1e-2


def test_new_tokens_are_written_at_their_block_table_slots():
    cache = KVCache.allocate(1, 8, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    key_cache, value_cache = cache.layer(0)
    batch = AttentionBatch.build([[5, 2], [7]], context_lens=[6, 1], query_lens=[3, 1], block_size=BLOCK)
    # sequence 0 computes positions 3, 4, 5: block 5 offset 3, block 2 offsets 0 and 1; sequence 1 position 0
    assert batch.slots.tolist() == [5 * BLOCK + 3, 2 * BLOCK, 2 * BLOCK + 1, 7 * BLOCK]
    assert batch.query_starts == [0, 3]
    k = torch.arange(4.0).view(4, 1, 1).expand(4, KV_HEADS, HEAD_DIM)
    write_kv(key_cache, value_cache, batch.slots, k, -k)
    assert key_cache[2, 1, 0, 0] == 2.0 and value_cache[7, 0, 1, 3] == -3.0


def test_cache_bytes_per_block():
    assert KVCache.bytes_per_block(2, BLOCK, KV_HEADS, HEAD_DIM, torch.float16) == 2 * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2
