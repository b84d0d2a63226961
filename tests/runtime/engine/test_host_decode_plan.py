"""The decode step's CPU plan (HostDecodePlan: RoPE + cache write and paged attention in fewer host ops) against a
float64 reference written out per row and head, on fresh random caches: ragged contexts over shuffled blocks, GQA,
sliding windows, padded rows (slot -1, context 0), odd head counts and block sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from qtool.runtime.engine.decode_step import DecodeInputs, HostDecodePlan


@dataclass
class Layer:  # the two DecodeLayer fields the plan reads
    scale: float
    sliding_window: int | None


def rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention64(q, key_cache, value_cache, tables, lens, block_size, scale, window):
    """Row by row, head by head, in float64: softmax over the row's visible positions."""
    batch, heads, d = q.shape
    kv_heads = key_cache.shape[-2]
    out = torch.zeros(batch, heads, d, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        visible = [p for p in range(n) if window is None or p >= n - window]
        slots = [int(tables[b][p // block_size]) * block_size + p % block_size for p in visible]
        keys = key_cache.reshape(-1, kv_heads, d)[slots].double()
        values = value_cache.reshape(-1, kv_heads, d)[slots].double()
        for h in range(heads):
            g = h // (heads // kv_heads)
            weights = torch.softmax(keys[:, g] @ q[b, h].double() * scale, dim=0)
            out[b, h] = weights @ values[:, g]
    return out


@pytest.mark.parametrize("heads, kv_heads, d, block_size, window", [(9, 3, 16, 4, None), (5, 5, 12, 3, 4),
                                                                     (6, 2, 8, 5, 7)])
def test_the_plan_matches_a_float64_reference(heads, kv_heads, d, block_size, window):
    seed = int(torch.randint(0, 1 << 30, ()).item())
    g = torch.Generator().manual_seed(seed)
    num_blocks, lens = 24, [13, 1, 0, 22, 7]  # row 2 is padding
    batch = len(lens)
    width = max(-(-n // block_size) for n in lens) + 1
    blocks = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        count = -(-n // block_size)
        tables[b, :count] = blocks[used:used + count]
        used += count
    key_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g)
    positions = torch.tensor([max(n - 1, 0) for n in lens])
    slots = torch.tensor([int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                          for b, n in enumerate(lens)])
    inputs = DecodeInputs(torch.zeros(batch, dtype=torch.long), positions, tables,
                          torch.tensor(lens, dtype=torch.int32), slots)
    angles = torch.rand(batch, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    q = torch.randn(batch, heads, d, generator=g)
    k, v = torch.randn(batch, kv_heads, d, generator=g), torch.randn(batch, kv_heads, d, generator=g)
    scale = 1 / math.sqrt(d)
    plan = HostDecodePlan(inputs, block_size, [Layer(scale, window)])

    expected_keys, expected_values = key_cache.double().clone(), value_cache.double().clone()
    rotated_k = rope64(k.double(), cos, sin)
    for b, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_keys.view(-1, kv_heads, d)[slot] = rotated_k[b]
            expected_values.view(-1, kv_heads, d)[slot] = v[b].double()
    before = key_cache.clone()
    got_q = plan.rope_and_cache(q, k, v, cos.float(), sin.float(), key_cache, value_cache)
    torch.testing.assert_close(got_q.double(), rope64(q.double(), cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key_cache.double(), expected_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_cache.double(), expected_values, rtol=0, atol=0)
    assert (key_cache != before).flatten(2).any(-1).sum() == sum(1 for n in lens if n), "one slot per real row"

    got = plan.attend(0, got_q, key_cache, value_cache)
    expected = attention64(got_q, key_cache, value_cache, tables, lens, block_size, scale, window)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(got[2], torch.zeros(heads, d)), "a padded row gives zeros"
