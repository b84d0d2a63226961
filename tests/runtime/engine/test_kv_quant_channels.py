"""The q4 cache (KIVI: keys per channel, values per token): the per-channel round trip within half a step against
float64, a block being filled held exactly as written (keys and values) until its last row, a query reading its
own block exact and earlier blocks quantized (paged attention against an independent float64 dense reference),
one-chunk prefill == chunked prefill == token by token, a full block shared through the prefix cache never quantized
again, a speculative tail rolled back and rewritten exactly, staging slots running out, keys stored before RoPE
(KVQuant) and rotated back at their positions when read, the model runner's RoPE for them on every family, and the
engine over a q4 cache: preempted and resumed equal to uninterrupted."""

from __future__ import annotations

import random

import pytest
import torch

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.attention import (AttentionBatch, allocate_kv_cache, cache_slots, paged_attention, read_kv,
                                           write_kv)
from qtool.runtime.engine.kv_quant import dequantize_q4, dequantize_q4_channels, quantize_q4_channels, rotation
from qtool.runtime.engine.model_runner import ENGINE_FAMILIES, ModelRunner
from qtool.runtime.engine.rope import apply_rope
from tests.helpers.key_rope import rope_float64, standard_key_rope


def random_keys(shape, seed):
    """float64 key-like values: unit normals, two outlier channels ten times larger and a per-channel offset."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[..., torch.randperm(shape[-1], generator=gen)[:2]] *= 10
    return x + 3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)


def half_step(x, valid):
    """Half the step of each (block, kv head, channel) of x [B, rows, heads, d] over its valid rows [B, rows], in
    float64: the channel's span over 15 steps, the minimum rounded down to float16 (up to a relative 2^-11 of it
    more span) and the step up (a relative 2^-10), plus float32's rounding of the input."""
    mask = valid[:, :, None, None]
    low = torch.where(mask, x, torch.inf).amin(dim=1)
    high = torch.where(mask, x, -torch.inf).amax(dim=1)
    span = high - low + low.abs() * 2**-10
    return span / 15 * (1 + 2**-9) / 2 + 1e-6 * x.abs().amax()


@pytest.mark.parametrize("shape", [(3, 16, 2, 64), (2, 5, 3, 16), (4, 8, 1, 40), (1, 64, 2, 128)])
def test_per_channel_round_trip_within_half_a_step(shape):
    x = random_keys(shape, seed=shape[-1] + shape[1])
    valid = torch.ones(shape[:2], dtype=torch.bool)
    valid[0, shape[1] // 2 :] = False  # a block partly filled: its empty rows take no part in its ranges
    packed, parameters = quantize_q4_channels(x.float(), valid)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:3], shape[3] // 2)
    assert parameters.dtype == torch.float16 and parameters.shape == (shape[0], shape[2], 2, shape[3])
    # the layout read independently: element 2j in the low nibble, 2j + 1 in the high one, x = code * scale + min
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(shape).double()
    scale, minimum = parameters[:, :, 0].double().unsqueeze(1), parameters[:, :, 1].double().unsqueeze(1)
    by_hand = codes * scale + minimum
    blocks_parameters = parameters.unsqueeze(1).expand(shape[0], shape[1], *parameters.shape[1:])
    torch.testing.assert_close(dequantize_q4_channels(packed, blocks_parameters).double(), by_hand, rtol=1e-6,
                               atol=1e-6)
    error = (by_hand - x).abs() * valid[:, :, None, None]
    assert (error <= half_step(x, valid).unsqueeze(1)).all()
    assert error.max() > half_step(x, valid).min() / 20  # a quantization happened


def q4_cache(num_blocks=8, block_size=4, kv_heads=2, head_dim=16, staging_slots=2):
    return allocate_kv_cache("q4", torch.float32, 1, num_blocks, block_size, kv_heads, head_dim, "cpu",
                             staging_slots=staging_slots)


def write_keys(cache, table, positions, keys, values=None):
    """Writes keys (and values, by default the keys) at the positions; returns the layer's (keys, values) parts,
    whose exact reads see this write's blocks."""
    key_cache, value_cache = cache.layer(0)
    slots = cache_slots(table, positions, cache.block_size)
    values = keys if values is None else values
    write_kv(key_cache, value_cache, slots, keys.float(), values.float(), torch.as_tensor(list(positions)))
    return key_cache, value_cache


def read_keys(cache, table, positions, part=None, exact=False):
    key_cache, value_cache = part or cache.layer(0)
    slots = cache_slots(table, positions, cache.block_size)
    return read_kv(key_cache, slots, torch.float64, torch.as_tensor(list(positions)), exact=exact)


def read_values(cache, table, positions, part=None, exact=False):
    _, value_cache = part or cache.layer(0)
    return read_kv(value_cache, cache_slots(table, positions, cache.block_size), torch.float64, exact=exact)


def block_bound(keys_block):
    """Each element's bound of a full block [rows, heads, d] as stored (no rope): half a step of its channel."""
    return half_step(keys_block.unsqueeze(0), torch.ones(1, keys_block.shape[0], dtype=torch.bool))[0]


def test_a_block_being_filled_is_exact_until_its_last_row_then_quantized_whole():
    cache, table = q4_cache(), [5, 2]
    keys, values = random_keys((6, 2, 16), seed=3), random_keys((6, 2, 16), seed=30)
    for position in range(3):  # decode steps: one row at a time into block 5
        write_keys(cache, table, [position], keys[position : position + 1], values[position : position + 1])
        assert torch.equal(read_keys(cache, table, range(position + 1)), keys[: position + 1].float().double())
        assert torch.equal(read_values(cache, table, range(position + 1)), values[: position + 1].float().double())
        assert not cache.key_codes[0, 5].any() and not cache.key_scales[0, 5].any()  # no key quantized yet
    part = write_keys(cache, table, [3, 4], keys[3:5], values[3:5])  # block 5's last row and block 2's first
    assert cache.tables[0].staged(5) is None and cache.tables[0].staged(2) is not None  # block 5's slot retired
    read = read_keys(cache, table, range(5), part)
    error = (read[:4] - keys[:4]).abs()
    assert (error <= block_bound(keys[:4])).all() and error.max() > 0
    assert torch.equal(read[4], keys[4].float().double())  # block 2's first row: staged, exact
    # this write's own reads (the queries of its blocks) see block 5 exact, keys and values
    assert torch.equal(read_keys(cache, table, range(5), part, exact=True), keys[:5].float().double())
    assert torch.equal(read_values(cache, table, range(5), part, exact=True), values[:5].float().double())
    # block 5's values read from their per-token codes (rotated): within their bound, not exact
    stored_values = read_values(cache, table, range(4), part)
    codes = cache.value_codes[0, 5], cache.value_scales[0, 5]
    torch.testing.assert_close(stored_values, (dequantize_q4(*codes) @ rotation(16).T).double(), rtol=1e-6,
                               atol=1e-6)
    assert stored_values.ne(values[:4].float().double()).any()
    # block 5's codes are those of its four rows quantized at once (not of the rows as they arrived)
    packed, parameters = quantize_q4_channels(keys[:4].float().unsqueeze(0), torch.ones(1, 4, dtype=torch.bool))
    assert torch.equal(cache.key_codes[0, 5], packed[0]) and torch.equal(cache.key_scales[0, 5], parameters[0])


def test_a_full_block_shared_by_the_prefix_cache_is_never_quantized_again():
    cache = q4_cache()
    keys = random_keys((14, 2, 16), seed=4)
    write_keys(cache, [1, 6, 3], range(10), keys[:10])  # sequence A: blocks 1 and 6 full, 3 being filled
    stored = [t[0, [1, 6]].clone() for t in (cache.key_codes, cache.key_scales, cache.value_codes)]
    before = read_keys(cache, [1, 6], range(8))
    # sequence B shares A's two full blocks (a prefix-cache hit) and writes only past them, into block 0
    write_keys(cache, [1, 6, 0], range(8, 12), keys[10:14])
    write_keys(cache, [1, 6, 0, 4], [12], keys[:1])
    after = [t[0, [1, 6]] for t in (cache.key_codes, cache.key_scales, cache.value_codes)]
    assert all(torch.equal(a, b) for a, b in zip(stored, after))
    assert torch.equal(read_keys(cache, [1, 6], range(8)), before)


def test_a_rolled_back_speculative_tail_is_rewritten_exactly_while_its_slot_lasts():
    keys = random_keys((6, 2, 16), seed=5)
    for staging_slots in (2, 1):
        cache, table = q4_cache(staging_slots=staging_slots), [3]
        write_keys(cache, table, [0, 1], keys[:2])
        # drafts inside the block: rows 2 (kept) and 3 (rejected) fill it, so it is quantized, its slot retired
        write_keys(cache, table, [2, 3], keys[2:4])
        if staging_slots == 1:  # another sequence's block takes the only slot: block 3's exact rows are gone
            write_keys(cache, [6], [0], keys[4:5])
        kept = read_keys(cache, table, range(3))
        # the target rewrites row 3 with its own token
        write_keys(cache, table, [3], keys[5:6])
        rows = torch.cat((keys[:3], keys[5:6])).float().double()
        read = read_keys(cache, table, range(4))
        if staging_slots == 2:  # restaged from the retired slot: quantized again from the exact rows
            packed, parameters = quantize_q4_channels(rows.float().unsqueeze(0), torch.ones(1, 4, dtype=torch.bool))
            assert torch.equal(cache.key_codes[0, 3], packed[0]) and torch.equal(cache.key_scales[0, 3], parameters[0])
            assert (read - rows).abs().le(block_bound(rows)).all()
        else:  # restaged from the dequantized rows: the kept rows as they read before, then quantized again
            restaged = torch.cat((kept, keys[5:6].float().double()))
            assert (read - restaged).abs().le(block_bound(restaged)).all()
    # rolled back inside a block still being filled: the rewritten rows are exact, the kept ones untouched
    cache, table = q4_cache(), [3]
    write_keys(cache, table, [0, 1, 2], keys[:3])
    write_keys(cache, table, [1, 2], keys[4:6])
    assert torch.equal(read_keys(cache, table, range(3)), torch.cat((keys[:1], keys[4:6])).float().double())


def test_staging_slots_running_out_quantize_the_oldest_block_and_stay_correct():
    cache = q4_cache(staging_slots=1)
    keys = random_keys((6, 2, 16), seed=6)
    write_keys(cache, [2], range(3), keys[:3])  # block 2 staged
    write_keys(cache, [7], range(2), keys[3:5])  # block 7 takes the only slot: block 2 quantized as it stands
    assert cache.tables[0].block_slot == {7: 0}
    read = read_keys(cache, [2], range(3))
    assert (read - keys[:3]).abs().le(block_bound(keys[:3])).all() and read.ne(keys[:3]).any()
    write_keys(cache, [2], [3], keys[5:6])  # block 2 goes on: its rows come back dequantized, then it is full
    rows = torch.cat((read, keys[5:6].float().double()))
    assert (read_keys(cache, [2], range(4)) - rows).abs().le(block_bound(rows)).all()
    assert torch.equal(read_keys(cache, [7], range(2)), keys[3:5].float().double())  # still staged, exact


def float16_toward(x, direction):
    """x [float64] rounded to float16 toward -inf or +inf."""
    rounded = x.half()
    beyond = (rounded.double() > x) if direction < 0 else (rounded.double() < x)
    return torch.where(beyond, torch.nextafter(rounded, torch.full_like(rounded, direction)), rounded).double()


def dense_own_block_attention(query, keys_before, values, positions, block_size, scale, group, rope):
    """An independent float64 reading of the q4 layout for one sequence written in one chunk: keys before RoPE
    quantized per channel over each full block (float16 minimum rounded down, step rounded up, 16 levels), values
    per token through their codes as the cache holds them (read back by the test), and each query reading its own
    block's keys and values exact, every earlier block as stored."""
    n = keys_before.shape[0]
    stored = keys_before.clone()
    for start in range(0, n - n % block_size, block_size):
        block = keys_before[start : start + block_size]
        low, high = block.amin(0), block.amax(0)
        minimum = float16_toward(low, -torch.inf)
        step = float16_toward((high - minimum) / 15, torch.inf)
        codes = ((block - minimum) / step.clamp_min(1e-30)).round().clamp(0, 15)
        stored[start : start + block_size] = codes * step + minimum
    exact_k, stored_k = rope(keys_before, positions), rope(stored, positions)
    exact_v, stored_v = values
    q_pos, k_pos = positions.unsqueeze(1), positions.unsqueeze(0)
    own = (q_pos // block_size) == (k_pos // block_size)
    out = []
    for head in range(query.shape[1]):
        kv = head // group
        q = query[:, head].double()
        scores = torch.where(own, q @ exact_k[:, kv].T, q @ stored_k[:, kv].T) * scale
        weights = scores.masked_fill(k_pos > q_pos, float("-inf")).softmax(-1)
        out.append((weights * own) @ exact_v[:, kv] + (weights * ~own) @ stored_v[:, kv])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("count,block_size,head_dim", [(23, 4, 16), (37, 8, 32), (70, 16, 64)])
def test_paged_attention_reads_its_own_block_exact_and_earlier_blocks_quantized(count, block_size, head_dim):
    """Against the float64 dense reference above, within float32's rounding (1e-4 of outputs of size ~1): a query
    of a block that this very chunk completes reads it exact, the queries of later blocks read it quantized."""
    heads, kv_heads = 6, 2
    gen = torch.Generator().manual_seed(count)
    cache = q4_cache(num_blocks=-(-count // block_size) + 3, block_size=block_size, kv_heads=kv_heads,
                     head_dim=head_dim, staging_slots=1)
    cache.key_ropes = [standard_key_rope(head_dim)]
    table = random.Random(count).sample(range(cache.num_blocks), -(-count // block_size))
    positions = torch.arange(count)
    keys_before = random_keys((count, kv_heads, head_dim), seed=count + 1)
    values = torch.randn(count, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    part = write_keys(cache, table, positions.tolist(), rope_float64(keys_before.float().double(), positions), values)
    query = torch.randn(count, heads, head_dim, generator=gen)
    batch = AttentionBatch.build([table], [count], [count], block_size)
    out = paged_attention(query, *part, batch, scale=head_dim**-0.5)
    stored_values = read_values(cache, table, range(count), part)  # per token: test_kv_quant.py bounds them
    rope = lambda x, p: rope_float64(x, p)  # noqa: E731
    expected = dense_own_block_attention(query, keys_before.float().double(), (values.float().double(), stored_values),
                                         positions, block_size, head_dim**-0.5, heads // kv_heads, rope)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    # and that is not attention over the exact keys and values: a quantization took part
    exact = dense_own_block_attention(query, keys_before.float().double(), (values.double(), values.double()),
                                      positions, count, head_dim**-0.5, heads // kv_heads, rope)
    assert (out.double() - exact).abs().max() > 1e-3


def chunked_logits(runner, ids, sizes):
    """Logits at every position of ids, prefilled through runner in chunks of the given sizes (one sequence)."""
    logits, start = [], 0
    for size in sizes:
        logits.append(runner.prompt_logits(ids[start : start + size], start=start))
        start += size
    assert start == len(ids)
    return torch.cat(logits)


@pytest.mark.parametrize("block_size", [4, 16])
def test_one_chunk_equals_chunked_prefill_equals_token_by_token(make_tiny_llama, block_size):
    """The same numbers whatever the chunking (float32 rounding apart): every query reads its own block exact,
    earlier blocks quantized, whether its chunk completed the block or a later one read it."""
    model = make_tiny_llama(head_dim=32, seed=5)
    ids = torch.randint(3, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(block_size))

    def runner():
        return ModelRunner(model, num_blocks=-(-45 // block_size), block_size=block_size, kv_cache="q4")

    one = runner().prompt_logits(ids)
    sizes = [5, block_size - 1, 1, block_size + 3]
    chunked = chunked_logits(runner(), ids, sizes + [45 - sum(sizes)])
    token_by_token = chunked_logits(runner(), ids, [1] * 45)
    scale = one.abs().max()
    assert (chunked - one).abs().max() <= 1e-5 * scale and (token_by_token - one).abs().max() <= 1e-5 * scale
    # the q4 cache is not the float one: its error is far over the chunkings' differences
    float_cache = ModelRunner(model, num_blocks=-(-45 // block_size), block_size=block_size).prompt_logits(ids)
    assert (float_cache - one).abs().max() > 1e-3 * scale


def test_q4_logits_against_the_models_own_forward_within_a_stated_bound(make_tiny_llama):
    """The model's dense forward (no cache) is the reference. Stated bound: the q4 cache's logits within 10% of the
    largest |logit| (random tiny models at SmolLM2's head_dim and q4's 64-token blocks: 2.8-5.5% over six seeds;
    their keys have no channel structure to exploit, real ones do), a float cache's within float rounding, and the
    first block's queries, which read only their own block, exact."""
    model = make_tiny_llama(head_dim=64, seed=6)
    ids = torch.randint(3, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(ids.unsqueeze(0), use_cache=False).logits[0].float()
    q4 = ModelRunner(model, num_blocks=3, block_size=64, kv_cache="q4").prompt_logits(ids)
    exact = ModelRunner(model, num_blocks=3, block_size=64).prompt_logits(ids)
    scale = dense.abs().max()
    assert (exact - dense).abs().max() <= 1e-5 * scale
    error = (q4 - dense).abs().max()
    assert 1e-4 * scale < error <= 0.10 * scale
    # the first block's queries read only their own block: exact
    assert (q4[:64] - dense[:64]).abs().max() <= 1e-5 * scale


def test_q4_engine_preempted_and_resumed_equals_uninterrupted(tiny_llama):
    prompts = [[1, 5, 9, 14, 3, 8, 21], list(range(40, 53)), [1, 77], [1, 5, 9, 60]]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    def run(num_blocks):
        engine = Engine(tiny_llama, None, EngineConfig(block_size=4, num_blocks=num_blocks, kv_cache="q4"))
        return [out.token_ids for out in engine.generate(prompts, greedy)], engine.stats().preemptions

    roomy, tight = run(64), run(9)
    assert tight[0] == roomy[0] and tight[1] > 0 and roomy[1] == 0


def test_keys_are_stored_before_rope_and_rotated_back_at_their_positions():
    cache, table = q4_cache(), [5, 2, 7]
    cache.key_ropes = [standard_key_rope(16)]
    before = random_keys((10, 2, 16), seed=7)  # channels with offsets of their own, as keys before RoPE have
    positions = torch.arange(10)
    after = rope_float64(before, positions)  # what attention computes and writes
    write_keys(cache, table, range(7), after[:7])  # block 5 full, block 2 being filled
    write_keys(cache, table, range(7, 10), after[7:])  # block 2 full, block 7 being filled
    # the full blocks' codes are those of the keys before RoPE, each block quantized at once
    for block, rows in ((5, slice(0, 4)), (2, slice(4, 8))):
        packed, parameters = quantize_q4_channels(before[rows].float().unsqueeze(0),
                                                  torch.ones(1, 4, dtype=torch.bool))
        assert torch.equal(cache.key_codes[0, block], packed[0])
        torch.testing.assert_close(cache.key_scales[0, block], parameters[0], rtol=2**-10, atol=0)
    read = read_keys(cache, table, range(10))
    # RoPE turns each pair of channels: an error vector keeps its length, so the bound before RoPE holds after it
    for rows in (slice(0, 4), slice(4, 8)):
        error = (read[rows] - after[rows]).norm(dim=-1)
        assert (error <= block_bound(before[rows]).norm(dim=-1) + 1e-5).all() and error.max() > 1e-3
    torch.testing.assert_close(read[8:], after[8:], rtol=0, atol=1e-5)  # staged: exact up to float32's rounding
    with pytest.raises(ValueError, match="positions"):
        read_kv(cache.layer(0)[0], cache_slots(table, range(3), 4), torch.float32)


def test_keys_before_rope_beat_keys_after_it_where_channels_have_offsets():
    """The reason for storing keys before RoPE (KVQuant): a channel's offset stays put before RoPE and turns with
    the position after it, widening each channel's range over a block. Same keys, same codes budget."""
    gen = torch.Generator().manual_seed(8)
    before = torch.randn(64, 2, 16, generator=gen, dtype=torch.float64) + 6 * torch.randn(16, generator=gen,
                                                                                         dtype=torch.float64)
    after = rope_float64(before, torch.arange(64))
    errors = {}
    for roped in (True, False):
        cache, table = q4_cache(num_blocks=6, block_size=16), [4, 1, 3, 0]
        if roped:
            cache.key_ropes = [standard_key_rope(16)]
        write_keys(cache, table, range(64), after)
        write_keys(cache, [5], [0], after[:1])  # another block's write: the first four are read as stored
        errors[roped] = (read_keys(cache, table, range(64)) - after).norm(dim=-1).mean()
    assert errors[True] < 0.8 * errors[False], errors


def test_the_runners_key_rope_is_the_models_own_on_every_family(tiny_family, build_family):
    if tiny_family not in ENGINE_FAMILIES:
        pytest.skip("a family the engine does not take")
    runner = ModelRunner(build_family(tiny_family), num_blocks=8, block_size=4, kv_cache="q4")
    positions = torch.tensor([0, 3, 17, 40])
    hidden = torch.zeros(len(positions), runner.config.hidden_size)
    ropes = runner._rope_per_layer(hidden, positions)
    x = torch.randn(len(positions), runner.kv_heads, runner.head_dim, generator=torch.Generator().manual_seed(9))
    layout = ENGINE_FAMILIES[runner.config.model_type].rope_layout
    for layer, (cos, sin) in enumerate(ropes):
        rope = runner.cache.key_ropes[layer]
        torch.testing.assert_close(rope.rotate(x, positions), apply_rope(x, cos, sin, layout), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rope.unrotate(rope.rotate(x, positions), positions), x, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's prefill attention over a q4 cache")
def test_q4_prompt_logits_on_the_gpu_match_the_cpu(make_tiny_llama):
    """The GPU's prefill attention reads the q4 cache as the CPU reference does (own block exact, keys before RoPE
    at their positions): both float32, so the two differ only where float rounding moves a code (a step of one
    key), far under the q4 bound."""
    import copy

    model = make_tiny_llama(head_dim=64, seed=4)
    ids = torch.randint(3, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(3))
    cpu = ModelRunner(model, num_blocks=12, block_size=4, kv_cache="q4").prompt_logits(ids)
    gpu = ModelRunner(copy.deepcopy(model).cuda(), num_blocks=12, block_size=4, kv_cache="q4").prompt_logits(ids)
    assert (gpu.cpu() - cpu).abs().max() <= 0.02 * cpu.abs().max()
