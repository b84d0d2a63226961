"""The KV cache kinds: quantize/dequantize round trips against float64 inputs within each kind's bound, the q4 byte
layout read independently, write/read through the cache at scrambled slots, the paged attention over a quantized
cache equal to dense attention on what the cache holds, and the bytes a block takes against the allocated tensors."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine.attention import (AttentionBatch, allocate_kv_cache, cache_slots, kv_cache_bytes_per_block,
                                            kv_cache_fixed_bytes, paged_attention, read_kv, write_kv)
from qtool.runtime.engine.kv_quant import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8, rotation
from qtool.runtime.kv_cache_names import KV_CACHE_KINDS, check_kv_cache

# odd shapes: head_dim 16, 40 and 96 (one q4 group: 64 does not divide them), 64 (one) and 128 (two groups)
SHAPES = [(5, 3, 16), (7, 2, 40), (9, 1, 64), (4, 3, 96), (3, 2, 128)]


def random_kv(shape, seed):
    """float64 K/V-like values: unit normals with a few outlier channels ten times larger, as keys have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    outliers = torch.randperm(shape[-1], generator=gen)[:2]
    x[..., outliers] *= 10
    return x


def q4_groups(x, head_dim):
    group = 64 if head_dim % 64 == 0 else head_dim
    return x.reshape(*x.shape[:-1], head_dim // group, group)


def q8_half_steps(x):
    """Half a q8 step of each element's (token, head) vector x [..., d]: absmax / 254, its float16 rounding
    (a relative 2^-11) and float32's rounding of the input with it."""
    absmax = x.abs().amax(dim=-1, keepdim=True)
    return (absmax / 254 * (1 + 2**-10) + 1e-6 * absmax).expand(x.shape)


def q4_half_steps(x):
    """Half a q4 step of each element's group: (max - min) / 30, with the float16 roundings of scale and minimum."""
    head_dim = x.shape[-1]
    groups = q4_groups(x, head_dim)
    span = groups.amax(dim=-1, keepdim=True) - groups.amin(dim=-1, keepdim=True)
    magnitude = groups.abs().amax(dim=-1, keepdim=True)
    return (span / 30 * (1 + 2**-9) + 2**-10 * magnitude).expand(groups.shape).reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_round_trip_within_half_a_step_of_each_heads_absmax(shape):
    x = random_kv(shape, seed=shape[-1])
    codes, scales = quantize_q8(x.float())
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float16 and scales.shape == (*x.shape[:-1], 1)
    error = (dequantize_q8(codes, scales).double() - x).abs()
    assert (error <= q8_half_steps(x)).all()
    assert error.max() > q8_half_steps(x).min() / 20  # a quantization happened (not a float copy)


@pytest.mark.parametrize("shape", SHAPES)
def test_q4_round_trip_within_half_a_step_of_each_groups_span(shape):
    head_dim = shape[-1]
    x = random_kv(shape, seed=head_dim + 1)
    packed, scales = quantize_q4(x.float())
    groups = 2 if head_dim == 128 else 1
    assert packed.dtype == torch.uint8 and packed.shape == (*x.shape[:-1], head_dim // 2)
    assert scales.dtype == torch.float16 and scales.shape == (*x.shape[:-1], 2 * groups)
    error = (dequantize_q4(packed, scales).double() - x).abs()
    assert (error <= q4_half_steps(x)).all()
    assert error.max() > q4_half_steps(x).min() / 20


def test_q4_byte_layout_read_independently():
    """Element 2j in the low nibble of byte j, 2j + 1 in the high one, codes 0..15; per group of 64 a float16
    scale, the scales first, then the minima: x = code * scale + minimum."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (3, 128), generator=gen)
    codes[:, 0], codes[:, 1], codes[:, 64], codes[:, 65] = 0, 15, 0, 15  # each group spans its full range
    scale, minimum = torch.tensor([0.5, 0.25]), torch.tensor([-3.0, -1.5])
    x = (codes.view(3, 2, 64) * scale.view(1, 2, 1) + minimum.view(1, 2, 1)).view(3, 128)
    packed, stored = quantize_q4(x)
    assert torch.equal(stored.float(), torch.cat((scale, minimum)).repeat(3, 1))
    for row in range(3):
        for j in range(64):
            byte = int(packed[row, j])
            assert byte & 15 == codes[row, 2 * j] and byte >> 4 == codes[row, 2 * j + 1]
    assert torch.equal(dequantize_q4(packed, stored), x)


@pytest.mark.parametrize("head_dim", [16, 64, 96, 128])
def test_the_rotation_is_orthogonal_and_spreads_an_outlier(head_dim):
    matrix = rotation(head_dim).double()
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-6)
    spike = torch.zeros(head_dim, dtype=torch.float64)
    spike[3] = 1.0
    assert (spike @ matrix).abs().max() < 0.6  # one channel's weight ends up shared by all of them


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_an_all_zero_head_stays_zero(kind):
    quantize, dequantize = (quantize_q8, dequantize_q8) if kind == "q8" else (quantize_q4, dequantize_q4)
    x = torch.zeros(2, 3, 64)
    x[1, 2] = torch.linspace(-1, 1, 64)
    out = dequantize(*quantize(x))
    assert torch.isfinite(out).all() and torch.equal(out[0], x[0])


# Bound on |read - written| of the float kinds relative to each element (the input's float64 -> float32 rounding
# included): float32 exact to its rounding, fp16 / bf16 half an ulp.
FLOAT_BOUNDS = {"auto": 2**-24, "fp16": 2**-11, "bf16": 2**-8}


@pytest.mark.parametrize("kind", KV_CACHE_KINDS)
@pytest.mark.parametrize("shape", [(3, 16), (2, 64), (1, 96)])
def test_cache_write_then_read_at_scrambled_slots(kind, shape):
    kv_heads, head_dim = shape
    num_blocks, block_size, tokens = 6, 4, 13
    cache = allocate_kv_cache(kind, torch.float32, 2, num_blocks, block_size, kv_heads, head_dim, "cpu")
    assert cache.is_quantized == (kind in ("q8", "q4"))
    gen = torch.Generator().manual_seed(head_dim)
    table = torch.randperm(num_blocks, generator=gen)[:4].tolist()
    slots = cache_slots(table, range(tokens), block_size)
    keys, values = random_kv((tokens, kv_heads, head_dim), 1), random_kv((tokens, kv_heads, head_dim), 2)
    key_cache, value_cache = cache.layer(1)
    write_kv(key_cache, value_cache, slots, keys.float(), values.float())
    untouched_key, _ = cache.layer(0)
    assert not read_kv(untouched_key, slots, torch.float32).any()  # layer 0 holds nothing
    for written, layer in ((keys, key_cache), (values, value_cache)):
        read = read_kv(layer, slots, torch.float64)
        assert read.shape == written.shape
        if kind in FLOAT_BOUNDS:
            assert ((read - written).abs() <= written.abs() * FLOAT_BOUNDS[kind]).all()
            continue
        if kind == "q4" and layer is key_cache:  # per channel over each full block: test_kv_quant_channels.py
            continue
        # (values, and q8 keys) stored: the rotated vectors within half a step each; read: rotated back, so the error vector of each
        # (token, kv head) keeps its length (the rotation is orthogonal), whatever channel it lands on
        rotated = written @ rotation(head_dim).double()
        half_steps = q8_half_steps(rotated) if kind == "q8" else q4_half_steps(rotated)
        bound = half_steps.pow(2).sum(dim=-1).sqrt() * (1 + 1e-5)
        assert ((read - written).norm(dim=-1) <= bound).all()
        # what is stored is the rotated vectors, each element within half a step (q4 values: their per-token codes,
        # written at once, besides the staged copy a block being filled reads)
        dequantize = dequantize_q8 if kind == "q8" else dequantize_q4
        codes = layer if kind == "q8" else layer.layer.values
        stored = dequantize(codes.codes.flatten(0, 1)[slots], codes.scales.flatten(0, 1)[slots]).double()
        assert ((stored - rotated).abs() <= half_steps).all()
        assert (read - written).norm(dim=-1).max() > bound.min() / 20


@pytest.mark.parametrize("kind", ["q8"])  # q4 (a query reads its own block exact): test_kv_quant_channels.py
def test_paged_attention_over_a_quantized_cache_is_attention_over_what_it_holds(kind):
    heads, kv_heads, head_dim, block_size = 6, 2, 32, 4
    gen = torch.Generator().manual_seed(11)
    cache = allocate_kv_cache(kind, torch.float32, 1, 12, block_size, kv_heads, head_dim, "cpu")
    key_cache, value_cache = cache.layer(0)
    shapes, tables, order = [(9, 9), (6, 1)], [], torch.randperm(12, generator=gen).tolist()
    for context, _ in shapes:
        tables.append([order.pop() for _ in range(-(-context // block_size))])
        slots = cache_slots(tables[-1], range(context), block_size)
        write_kv(key_cache, value_cache, slots, torch.randn(context, kv_heads, head_dim, generator=gen),
                 torch.randn(context, kv_heads, head_dim, generator=gen))
    query = torch.randn(10, heads, head_dim, generator=gen)
    batch = AttentionBatch.build(tables, [9, 6], [9, 1], block_size)
    out = paged_attention(query, key_cache, value_cache, batch, scale=0.2)
    expected, start = [], 0
    for (context, count), table in zip(shapes, tables):
        slots = cache_slots(table, range(context), block_size)
        k = read_kv(key_cache, slots, torch.float64).repeat_interleave(3, dim=1).transpose(0, 1)
        v = read_kv(value_cache, slots, torch.float64).repeat_interleave(3, dim=1).transpose(0, 1)
        q = query[start : start + count].double().transpose(0, 1)
        mask = torch.arange(context).unsqueeze(0) <= torch.arange(context - count, context).unsqueeze(1)
        weights = (q @ k.transpose(1, 2) * 0.2).masked_fill(~mask, float("-inf")).softmax(dim=-1)
        expected.append((weights @ v).transpose(0, 1))
        start += count
    torch.testing.assert_close(out.double(), torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KV_CACHE_KINDS)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_bytes_per_block_is_what_the_cache_allocates(kind, head_dim):
    """Blocks plus the fixed part: a q4 cache's staging slots of keys and values (float32 here, as the model's
    dtype)."""
    cache = allocate_kv_cache(kind, torch.float32, 3, 5, 8, 2, head_dim, "cpu", staging_slots=2)
    fixed = kv_cache_fixed_bytes(kind, torch.float32, 3, 8, 2, head_dim, staging_slots=2)
    assert cache.nbytes == 5 * kv_cache_bytes_per_block(kind, torch.float32, 3, 8, 2, head_dim) + fixed
    assert fixed == (2 * 3 * 2 * 8 * 2 * head_dim * 4 if kind == "q4" else 0)
    assert (cache.num_blocks, cache.block_size) == (5, 8)


def test_bad_kinds_are_one_line_errors():
    with pytest.raises(QtoolError, match="'q3' is not a KV cache kind \\(use one of auto, fp16, bf16, q8, q4\\)"):
        check_kv_cache("q3")
    with pytest.raises(QtoolError, match="q4 KV cache packs two codes per byte; this model's head_dim is 15"):
        allocate_kv_cache("q4", torch.float32, 1, 2, 4, 1, 15, "cpu")
