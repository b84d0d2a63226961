"""Paged decode attention over the q4 cache layout: the torch reference (engine_ops_ref.paged_decode_attention_q4_ref)
against the runtime's own q4 cache read by its paged attention (the same layout: keys per channel per block before
RoPE, values per token rotated, each sequence's own block exact from its staging slot), then the Triton kernel
against the reference on fresh random codes, odd head dims (value groups of the whole head), GQA groups, block
sizes, sliding windows, empty sequences and sequences without a staging slot. On a CPU the kernel runs under the
Triton interpreter; on a GPU the same tests run it compiled."""

import random

import pytest
import torch
from kernel_env import DEVICE


from qtool.kernels.engine_ops_ref import paged_decode_attention_q4_ref
from qtool.kernels.engine_ops_triton import paged_decode_attention_q4_triton, triton_interpreted
from qtool.runtime.engine.attention import (AttentionBatch, allocate_kv_cache, cache_slots,
                                           paged_attention, write_kv)
from tests.helpers.key_rope import standard_key_rope


def rope_tables(positions: int, head_dim: int):
    return standard_key_rope(head_dim).tables(torch.arange(positions))


def random_q4_case(seed, batch, heads, kv_heads, head_dim, block_size, contexts, window=None, staged=None):
    """Random codes, parameters, staging and tables: every field of the layout, none of it from a quantizer."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-c // block_size) for c in contexts))
    num_blocks, slots = batch * max_blocks + 3, batch + 1
    groups = head_dim // 64 if head_dim % 64 == 0 else 1
    byte = lambda *shape: torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)  # noqa: E731
    case = dict(
        query=torch.randn(batch, heads, head_dim, generator=gen),
        key_codes=byte(num_blocks, block_size, kv_heads, head_dim // 2),
        key_parameters=torch.stack((torch.rand(num_blocks, kv_heads, head_dim, generator=gen) * 0.3,
                                    torch.randn(num_blocks, kv_heads, head_dim, generator=gen) * 2), 2).half(),
        value_codes=byte(num_blocks, block_size, kv_heads, head_dim // 2),
        value_parameters=torch.cat((torch.rand(num_blocks, block_size, kv_heads, groups, generator=gen) * 0.2,
                                    torch.randn(num_blocks, block_size, kv_heads, groups, generator=gen) - 1.5),
                                   -1).half(),
        key_staging=torch.randn(slots, block_size, kv_heads, head_dim, generator=gen) * 2,
        value_staging=torch.randn(slots, block_size, kv_heads, head_dim, generator=gen),
        rotation=torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)).Q.float(),
    )
    case["cos"], case["sin"] = rope_tables(max_blocks * block_size + 5, head_dim)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    case["block_tables"] = torch.tensor([order[b * max_blocks : (b + 1) * max_blocks] for b in range(batch)],
                                        dtype=torch.int32)
    case["context_lens"] = torch.tensor(contexts, dtype=torch.int32)
    staged = staged if staged is not None else [b % 3 != 2 for b in range(batch)]  # some without a slot
    case["own_slots"] = torch.tensor([(b + 1) % slots if s else -1 for b, s in enumerate(staged)], dtype=torch.int32)
    return case, dict(scale=head_dim**-0.5, sliding_window=window)


def test_the_reference_reads_the_runtimes_q4_cache_as_its_paged_attention_does():
    """A q4 cache written token by token by the runtime (keys after RoPE at their positions): the decode query's
    attention through paged_attention equals the reference's over the cache's tensors, own block from its slot."""
    heads, kv_heads, head_dim, block_size, count = 6, 2, 64, 8, 29
    cache = allocate_kv_cache("q4", torch.float32, 1, 6, block_size, kv_heads, head_dim, "cpu", staging_slots=2)
    cache.key_ropes = [standard_key_rope(head_dim)]
    gen = torch.Generator().manual_seed(3)
    table = random.Random(3).sample(range(6), -(-count // block_size))
    keys_part, values_part = cache.layer(0)
    for position in range(count):  # decodes: each token written, then read by its own query
        slot = cache_slots(table, [position], block_size)
        write_kv(keys_part, values_part, slot, torch.randn(1, kv_heads, head_dim, generator=gen),
                 torch.randn(1, kv_heads, head_dim, generator=gen), torch.tensor([position]))
    query = torch.randn(1, heads, head_dim, generator=gen)
    batch = AttentionBatch.build([table], [count], [1], block_size)
    expected = paged_attention(query, keys_part, values_part, batch, head_dim**-0.5)
    cos, sin = rope_tables(count + 3, head_dim)
    own = cache.tables[0].block_slot.get(table[(count - 1) // block_size], -1)
    got = paged_decode_attention_q4_ref(query, cache.key_codes[0], cache.key_scales[0], cache.value_codes[0],
                                        cache.value_scales[0], cache.key_staging[0], cache.value_staging[0],
                                        cache.rotation, cos, sin, torch.tensor([table], dtype=torch.int32),
                                        torch.tensor([count]), torch.tensor([own]), head_dim**-0.5)
    assert own >= 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,contexts,window", [
    (4, 2, 16, 4, [1, 7, 13], None),
    (6, 2, 48, 16, [33, 16, 0, 5], None),  # d 48: one value group; an empty sequence
    (3, 3, 64, 64, [70, 64, 1], 37),
    (8, 2, 128, 16, [50, 17], None),  # two value groups
])
def test_the_q4_kernel_equals_its_reference(kernels_can_run, heads, kv_heads, head_dim, block_size, contexts,
                                            window):
    assert DEVICE == "cuda" or triton_interpreted()
    case, options = random_q4_case(head_dim + block_size, len(contexts), heads, kv_heads, head_dim, block_size,
                                   contexts, window)
    expected = paged_decode_attention_q4_ref(**case, **options)
    device_case = {name: t.to(DEVICE) for name, t in case.items()}
    got = paged_decode_attention_q4_triton(**device_case, **options).cpu()
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected, rtol=5e-5, atol=5e-5)
    # the staging slot matters: read from the codes instead, the own block's tokens change the output
    unstaged, _ = random_q4_case(head_dim + block_size, len(contexts), heads, kv_heads, head_dim, block_size,
                                 contexts, window, staged=[False] * len(contexts))
    moved = paged_decode_attention_q4_ref(**unstaged, **options)
    assert (moved - expected)[case["own_slots"] >= 0].abs().max() > 1e-3


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("window", [None, 21])
def test_the_q4_kernel_split_over_the_context_equals_its_reference(kernels_can_run, num_splits, window):
    """Flash-decoding splits (each a whole number of tiles, some empty for the shorter sequences, the own block in
    one of them): the reduced rows equal the reference's, and the rule splits a lone sequence."""
    from qtool.kernels.engine_ops_triton import decode_splits

    case, options = random_q4_case(num_splits, 2, 4, 1, 32, 16, [75, 20], window)
    expected = paged_decode_attention_q4_ref(**case, **options)
    device_case = {name: t.to(DEVICE) for name, t in case.items()}
    got = paged_decode_attention_q4_triton(**device_case, **options, num_splits=num_splits).cpu()
    torch.testing.assert_close(got, expected, rtol=5e-5, atol=5e-5)
    assert decode_splits(1, 1, 20, 16, 32, 4) > 1  # a lone sequence of 320 tokens on a 4-SM device


def test_the_router_takes_the_reference_off_cuda_and_the_kernel_refuses_wide_heads():
    from qtool.core.errors import QtoolError
    from qtool.kernels.engine_ops import paged_decode_attention_q4

    case, options = random_q4_case(1, 2, 4, 2, 32, 8, [9, 3])
    torch.testing.assert_close(paged_decode_attention_q4(**case, **options),
                               paged_decode_attention_q4_ref(**case, **options), rtol=0, atol=0)
    wide, _ = random_q4_case(2, 1, 2, 1, 256, 4, [3])
    with pytest.raises(QtoolError, match="head_dim 256 is over the kernel's 128"):
        paged_decode_attention_q4_triton(**{name: t.to(DEVICE) for name, t in wide.items()}, **options)


def random_write_case(seed, tokens, heads, kv_heads, head_dim, block_size, dtype=torch.float32):
    """A q4 layer's write inputs: fresh random q/k/v, RoPE tables at random positions, random prior cache contents,
    some rows padded (slot -1) and some without a staging row."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, slots = tokens + 3, tokens + 2
    groups = head_dim // 64 if head_dim % 64 == 0 else 1
    positions = torch.randint(0, 4 * block_size, (tokens,), generator=gen)
    cos, sin = rope_tables(4 * block_size, head_dim)
    flat_slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    flat_slots[tokens // 2] = -1  # a padded row: nothing stored
    staging_rows = torch.randperm(slots * block_size, generator=gen)[:tokens]
    staging_rows[tokens // 2] = -1
    if tokens > 2:
        staging_rows[0] = -1  # a row whose value is coded but not staged
    case = dict(
        query=torch.randn(tokens, heads, head_dim, generator=gen).to(dtype),
        key=(torch.randn(tokens, kv_heads, head_dim, generator=gen) * 2 + 0.5).to(dtype),
        value=torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype),
        cos=cos[positions].to(dtype), sin=sin[positions].to(dtype), key_cos=cos[positions], key_sin=sin[positions],
        rotation=torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)).Q.float(),
        key_staging=torch.randn(slots, block_size, kv_heads, head_dim, generator=gen).to(dtype),
        value_staging=torch.randn(slots, block_size, kv_heads, head_dim, generator=gen).to(dtype),
        value_codes=torch.randint(0, 256, (num_blocks, block_size, kv_heads, head_dim // 2), generator=gen,
                                  dtype=torch.uint8),
        value_parameters=torch.randn(num_blocks, block_size, kv_heads, 2 * groups, generator=gen).half(),
        staging_rows=staging_rows, slots=flat_slots,
    )
    return case


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,block_size,dtype", [
    (5, 4, 2, 16, 4, torch.float32),
    (3, 6, 3, 48, 16, torch.float32),  # d 48: one value group of the whole head
    (4, 3, 1, 128, 8, torch.float32),  # two value groups
    (6, 4, 2, 64, 64, torch.bfloat16),
])
def test_the_q4_write_kernel_equals_its_reference(kernels_can_run, tokens, heads, kv_heads, head_dim, block_size,
                                                  dtype):
    from qtool.kernels.engine_ops_ref import rope_and_cache_q4_ref
    from qtool.kernels.engine_ops_triton import rope_and_cache_q4_triton

    case = random_write_case(tokens + head_dim, tokens, heads, kv_heads, head_dim, block_size, dtype)
    before = {name: t.clone() for name, t in case.items()}
    expected_query = rope_and_cache_q4_ref(**case)
    expected = {name: case[name] for name in ("key_staging", "value_staging", "value_codes", "value_parameters")}
    device_case = {name: t.clone().to(DEVICE) for name, t in before.items()}
    got_query = rope_and_cache_q4_triton(**device_case).cpu()
    torch.testing.assert_close(got_query, expected_query, rtol=0, atol=0)
    tolerance = dict(rtol=0, atol=0) if dtype == torch.float32 and DEVICE == "cpu" else dict(rtol=1e-6, atol=1e-6)
    for name in ("key_staging", "value_staging"):
        torch.testing.assert_close(device_case[name].cpu(), expected[name], **tolerance)
    # the write happened where it should, and nowhere else
    staged = before["staging_rows"][before["staging_rows"] >= 0]
    moved = (expected["key_staging"] != before["key_staging"]).flatten(0, 1).any(-1).any(-1)
    assert set(moved.nonzero().flatten().tolist()) <= set(staged.tolist()) and moved.any()
    coded = before["slots"][before["slots"] >= 0]
    got_codes, got_parameters = device_case["value_codes"].cpu(), device_case["value_parameters"].cpu()
    untouched = torch.ones(got_codes.shape[0] * got_codes.shape[1], dtype=torch.bool)
    untouched[coded] = False
    assert torch.equal(got_codes.flatten(0, 1)[untouched], before["value_codes"].flatten(0, 1)[untouched])
    torch.testing.assert_close(got_parameters, expected["value_parameters"], rtol=1e-3, atol=1e-6)
    # codes: the same but where a float32 sum in another order crosses a rounding boundary
    nibbles = lambda p: torch.stack((p & 15, p >> 4), -1)  # noqa: E731
    differ = (nibbles(got_codes) != nibbles(expected["value_codes"])).float().mean()
    assert differ <= 0.002, f"{differ:.4f} of the value codes differ"
    torch.testing.assert_close(got_codes.flatten(0, 1)[coded].float(),
                               expected["value_codes"].flatten(0, 1)[coded].float(), rtol=0, atol=16)


def test_the_q4_write_reference_is_the_runtime_caches_write():
    """rope_and_cache_q4_ref stores what Q4CacheLayer.write stores for a token of a block being filled: the key
    before RoPE (from the key after it, as the module path has it), the value exact, the value's codes."""
    from qtool.kernels.engine_ops_ref import rope_and_cache_q4_ref, rope_and_cache_ref

    heads, kv_heads, head_dim, block_size = 4, 2, 64, 8
    cache = allocate_kv_cache("q4", torch.float32, 1, 5, block_size, kv_heads, head_dim, "cpu", staging_slots=3)
    cache.key_ropes = [standard_key_rope(head_dim)]
    gen = torch.Generator().manual_seed(8)
    positions, slots = torch.tensor([3, 11, 0]), torch.tensor([2 * block_size + 3, 4 * block_size + 3, block_size])
    query = torch.randn(3, heads, head_dim, generator=gen)
    key, value = torch.randn(3, kv_heads, head_dim, generator=gen), torch.randn(3, kv_heads, head_dim, generator=gen)
    cos, sin = rope_tables(16, head_dim)
    float_keys = torch.zeros(5, block_size, kv_heads, head_dim)
    rotated_query = rope_and_cache_ref(query, key, value, cos[positions], sin[positions], float_keys,
                                       torch.zeros_like(float_keys), slots)
    keys_part, values_part = cache.layer(0)
    write_kv(keys_part, values_part, slots, float_keys.view(-1, kv_heads, head_dim)[slots], value, positions)
    table = cache.tables[0]
    staging_rows = torch.tensor([table.block_slot[s // block_size] * block_size + s % block_size
                                 for s in slots.tolist()])
    mine = allocate_kv_cache("q4", torch.float32, 1, 5, block_size, kv_heads, head_dim, "cpu", staging_slots=3)
    got = rope_and_cache_q4_ref(query, key, value, cos[positions], sin[positions], cos[positions], sin[positions],
                                cache.rotation, mine.key_staging[0], mine.value_staging[0], mine.value_codes[0],
                                mine.value_scales[0], staging_rows, slots)
    assert torch.equal(got, rotated_query)
    for name in ("key_staging", "value_staging", "value_codes", "value_scales"):
        assert torch.equal(getattr(mine, name), getattr(cache, name)), name
