"""The q8 KV cache's decode-step ops: its torch references against the runtime's own q8 cache (written by
write_kv, read by paged_attention), then the Triton write and attention against the references on fresh random
inputs: padded rows, GQA groups, odd head dims (a rotation that is no Hadamard matrix), block sizes, sliding
windows, empty sequences, flash-decoding splits, float32/float16/bfloat16 queries. On a CPU the kernels run under
the Triton interpreter; on a GPU the same tests run them compiled."""

import random

import pytest
import torch
from kernel_env import DEVICE

from qtool.kernels.engine_ops_ref import (paged_decode_attention_q8_ref, quantize_q8_ref, rope_and_cache_q8_ref,
                                         rope_and_cache_ref)
from qtool.kernels.engine_ops_triton import paged_decode_attention_q8_triton, rope_and_cache_q8_triton
from qtool.runtime.engine.attention import AttentionBatch, allocate_kv_cache, cache_slots, paged_attention, write_kv
from qtool.runtime.engine.kv_quant import rotation as cache_rotation
from tests.helpers.key_rope import standard_key_rope


def random_q8_case(seed, batch, heads, kv_heads, head_dim, block_size, contexts, window=None, dtype=torch.float32):
    """Random codes, scales, rotation and tables: every field of the layout, none of it from a quantizer."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-c // block_size) for c in contexts))
    num_blocks = batch * max_blocks + 3
    codes = lambda: torch.randint(-127, 128, (num_blocks, block_size, kv_heads, head_dim), generator=gen,  # noqa: E731
                                  dtype=torch.int8)
    scales = lambda: (torch.rand(num_blocks, block_size, kv_heads, 1, generator=gen) * 0.05 + 1e-3).half()  # noqa: E731
    case = dict(query=torch.randn(batch, heads, head_dim, generator=gen).to(dtype), key_codes=codes(),
                key_scales=scales(), value_codes=codes(), value_scales=scales(),
                rotation=torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)).Q.float())
    order = torch.randperm(num_blocks, generator=gen).tolist()
    case["block_tables"] = torch.tensor([order[b * max_blocks : (b + 1) * max_blocks] for b in range(batch)],
                                        dtype=torch.int32)
    case["context_lens"] = torch.tensor(contexts, dtype=torch.int32)
    return case, dict(scale=head_dim**-0.5, sliding_window=window)


def test_the_references_are_the_runtimes_q8_cache():
    """A q8 cache written token by token by the runtime (write_kv, keys after RoPE): the reference write puts the
    same codes and scales in a second cache, and the reference attention over the cache's tensors equals
    paged_attention's read of it."""
    heads, kv_heads, head_dim, block_size, count = 6, 2, 64, 8, 29
    caches = [allocate_kv_cache("q8", torch.float32, 1, 6, block_size, kv_heads, head_dim, "cpu") for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    table = random.Random(3).sample(range(6), -(-count // block_size))
    cos, sin = standard_key_rope(head_dim).tables(torch.arange(count))
    keys_part, values_part = caches[0].layer(0)
    for position in range(count):
        slot = cache_slots(table, [position], block_size)
        query = torch.randn(1, heads, head_dim, generator=gen)
        key, value = (torch.randn(1, kv_heads, head_dim, generator=gen) for _ in range(2))
        row = slice(position, position + 1)
        rotated_query = rope_and_cache_ref(query, key, value, cos[row], sin[row], torch.zeros(9, 1, kv_heads, head_dim),
                                           torch.zeros(9, 1, kv_heads, head_dim), torch.tensor([0]))
        rotated_key = rope_and_cache_q8_ref(query, key, value, cos[row], sin[row], caches[1].rotation,
                                            caches[1].key_codes[0], caches[1].key_scales[0], caches[1].value_codes[0],
                                            caches[1].value_scales[0], slot)
        torch.testing.assert_close(rotated_key, rotated_query, rtol=0, atol=0)
        turned_key = rope_and_cache_ref(key, key, value, cos[row], sin[row], torch.zeros(9, 1, kv_heads, head_dim),
                                        torch.zeros(9, 1, kv_heads, head_dim), torch.tensor([0]))
        write_kv(keys_part, values_part, slot, turned_key, value, torch.tensor([position]))
    for name in ("key_codes", "key_scales", "value_codes", "value_scales"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name
    batch = AttentionBatch.build([table], [count], [1], block_size)
    expected = paged_attention(query, keys_part, values_part, batch, head_dim**-0.5)
    cache = caches[0]
    got = paged_decode_attention_q8_ref(query, cache.key_codes[0], cache.key_scales[0], cache.value_codes[0],
                                        cache.value_scales[0], cache.rotation, torch.tensor([table], dtype=torch.int32),
                                        torch.tensor([count]), head_dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


TOLERANCE = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,contexts,window,dtype", [
    (4, 2, 16, 4, [1, 7, 13], None, torch.float32),
    (6, 2, 48, 16, [33, 16, 0, 5], None, torch.float32),  # an empty sequence
    (3, 3, 64, 64, [70, 64, 1], 37, torch.float16),
    (8, 2, 128, 16, [50, 17], None, torch.bfloat16),
    (2, 1, 96, 8, [40], 9, torch.float32),  # d 96: a rotation that is no Hadamard matrix
])
def test_the_q8_attention_kernel_equals_its_reference(kernels_can_run, heads, kv_heads, head_dim, block_size,
                                                      contexts, window, dtype):
    case, options = random_q8_case(head_dim + block_size, len(contexts), heads, kv_heads, head_dim, block_size,
                                   contexts, window, dtype)
    expected = paged_decode_attention_q8_ref(**case, **options)
    got = paged_decode_attention_q8_triton(**{name: t.to(DEVICE) for name, t in case.items()}, **options).cpu()
    assert got.dtype == dtype and got.isfinite().all()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert got[case["context_lens"] == 0].abs().max() == 0 if (case["context_lens"] == 0).any() else True


@pytest.mark.parametrize("num_splits", [2, 5])
def test_the_q8_attention_kernel_split_over_the_context_equals_its_reference(kernels_can_run, num_splits):
    case, options = random_q8_case(num_splits, 2, 4, 1, 32, 16, [75, 20], 30)
    expected = paged_decode_attention_q8_ref(**case, **options)
    got = paged_decode_attention_q8_triton(**{name: t.to(DEVICE) for name, t in case.items()}, **options,
                                           num_splits=num_splits).cpu()
    torch.testing.assert_close(got, expected, rtol=5e-5, atol=5e-5)


def random_write_case(seed, tokens, heads, kv_heads, head_dim, block_size, dtype):
    """A q8 layer's write inputs: fresh random q/k/v, RoPE tables at random positions, random prior codes and
    scales, some rows padded (slot -1)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = tokens + 3
    positions = torch.randint(0, 4 * block_size, (tokens,), generator=gen)
    cos, sin = standard_key_rope(head_dim).tables(positions)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1
    shape = (num_blocks, block_size, kv_heads)
    prior = lambda: torch.randint(-127, 128, (*shape, head_dim), generator=gen, dtype=torch.int8)  # noqa: E731
    return dict(query=torch.randn(tokens, heads, head_dim, generator=gen).to(dtype),
                key=(torch.randn(tokens, kv_heads, head_dim, generator=gen) * 3).to(dtype),
                value=torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype),
                cos=cos.to(dtype), sin=sin.to(dtype), rotation=cache_rotation(head_dim),
                key_codes=prior(), key_scales=torch.rand(*shape, 1, generator=gen).half(), value_codes=prior(),
                value_scales=torch.rand(*shape, 1, generator=gen).half(), slots=slots)


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,dtype", [
    (7, 4, 2, 64, torch.float32),
    (5, 6, 3, 48, torch.bfloat16),  # d 48: a random orthogonal rotation, two chunks of 32 with a partial one
    (4, 2, 2, 128, torch.float16),
])
def test_the_q8_write_kernel_equals_its_reference(kernels_can_run, tokens, heads, kv_heads, head_dim, dtype):
    case = random_write_case(tokens + head_dim, tokens, heads, kv_heads, head_dim, 8, dtype)
    expected_case = {name: t.clone() for name, t in case.items()}
    expected_query = rope_and_cache_q8_ref(**expected_case)
    device_case = {name: t.to(DEVICE) for name, t in case.items()}
    got_query = rope_and_cache_q8_triton(**device_case).cpu()
    # 16-bit queries round to the same value; a float32 one keeps the GPU's fused multiply-add, an ulp or two off the
    # reference's separate multiply and add (measured on the H100: 2.4e-7 at most)
    exact = dtype != torch.float32
    torch.testing.assert_close(got_query, expected_query, rtol=0 if exact else 2e-6, atol=0 if exact else 1e-6)
    for name in ("key", "value"):
        codes, scales = device_case[f"{name}_codes"].cpu(), device_case[f"{name}_scales"].cpu()
        expected_codes, expected_scales = expected_case[f"{name}_codes"], expected_case[f"{name}_scales"]
        torch.testing.assert_close(scales, expected_scales, rtol=1e-3, atol=0)  # one float16 step at most
        differ = (codes.int() - expected_codes.int()).abs()
        assert differ.max() <= 1 and (differ > 0).float().mean() < 0.01, f"{name} codes off a rounding boundary"
        padded = case["slots"] < 0  # no write: the prior codes stay
        unwritten = torch.ones(codes.shape[:2], dtype=torch.bool).view(-1)
        unwritten[case["slots"][~padded]] = False
        assert torch.equal(codes.view(-1, *codes.shape[2:])[unwritten],
                           case[f"{name}_codes"].view(-1, *codes.shape[2:])[unwritten])


def test_the_q8_write_then_attention_reads_back_what_was_written(kernels_can_run):
    """A full round trip through both kernels: the attention over freshly written codes is within q8's rounding
    of attention over the float K/V."""
    gen = torch.Generator().manual_seed(5)
    tokens, heads, kv_heads, head_dim, block_size = 12, 4, 2, 64, 4
    case = random_write_case(5, tokens, heads, kv_heads, head_dim, block_size, torch.float32)
    case["slots"] = torch.arange(tokens)  # one sequence in blocks 0, 1, 2
    device_case = {name: t.to(DEVICE) for name, t in case.items()}
    rope_and_cache_q8_triton(**device_case)
    query = torch.randn(1, heads, head_dim, generator=gen)
    tables = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    got = paged_decode_attention_q8_triton(query.to(DEVICE), device_case["key_codes"], device_case["key_scales"],
                                           device_case["value_codes"], device_case["value_scales"],
                                           device_case["rotation"], tables.to(DEVICE),
                                           torch.tensor([tokens], dtype=torch.int32, device=DEVICE), head_dim**-0.5)
    float_keys = torch.zeros(3, block_size, kv_heads, head_dim)
    float_values = torch.zeros_like(float_keys)
    rope_and_cache_ref(case["query"], case["key"], case["value"], case["cos"], case["sin"], float_keys, float_values,
                       case["slots"])
    from qtool.kernels.engine_ops_ref import paged_decode_attention_ref

    expected = paged_decode_attention_ref(query, float_keys, float_values, tables, torch.tensor([tokens]),
                                          head_dim**-0.5)
    torch.testing.assert_close(got.cpu(), expected, rtol=0.02, atol=0.02)
    assert (got.cpu() - expected).abs().max() > 0, "read back through 8-bit codes, not the float values"


def test_quantize_q8_ref_is_the_caches_quantizer():
    from qtool.runtime.engine.kv_quant import quantize_q8

    x = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(0))
    for got, expected in zip(quantize_q8(x), quantize_q8_ref(x)):
        assert torch.equal(got, expected)
