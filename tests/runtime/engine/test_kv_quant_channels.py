"""The q4 cache's keys per channel (KIVI): the per-channel round trip within half a step against float64, a block
being filled held exactly as written until its last row, a full block shared through the prefix cache never
quantized again, a speculative tail rolled back and rewritten, staging slots running out, keys stored before RoPE
(KVQuant) and rotated back at their positions when read, the model runner's RoPE for them on every family, and the
engine over a q4 cache: preempted and resumed equal to uninterrupted."""

from __future__ import annotations

import pytest
import torch

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.attention import allocate_kv_cache, cache_slots, read_kv, write_kv
from qtool.runtime.engine.kv_quant import dequantize_q4_channels, quantize_q4_channels, rotation
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
    """Half the step of each (block, kv head) of x [B, rows, heads, d] over its valid rows [B, rows], in float64:
    the widest channel's span / 14 or the largest |x| / 127, rounded up to float16 (a relative 2^-10), with
    float32's rounding of the input."""
    mask = valid[:, :, None, None]
    low = torch.where(mask, x, torch.inf).amin(dim=1)
    high = torch.where(mask, x, -torch.inf).amax(dim=1)
    needed = torch.maximum((high - low) / 14, torch.maximum(low.abs(), high.abs()) / 127).amax(dim=-1, keepdim=True)
    return needed * (1 + 2**-10) / 2 + 1e-6 * x.abs().amax()


@pytest.mark.parametrize("shape", [(3, 16, 2, 64), (2, 5, 3, 16), (4, 8, 1, 40), (1, 16, 2, 128)])
def test_per_channel_round_trip_within_half_a_step(shape):
    x = random_keys(shape, seed=shape[-1] + shape[1])
    valid = torch.ones(shape[:2], dtype=torch.bool)
    valid[0, shape[1] // 2 :] = False  # a block partly filled: its empty rows take no part in its ranges
    packed, zeros, scales = quantize_q4_channels(x.float(), valid)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:3], shape[3] // 2)
    assert zeros.dtype == torch.int8 and zeros.shape == (shape[0], shape[2], shape[3])
    assert scales.dtype == torch.float16 and scales.shape == (shape[0], shape[2], 1)
    # the layout read independently: element 2j in the low nibble, 2j + 1 in the high one, x = (code + zero) * scale
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(shape).double()
    by_hand = (codes + zeros.double().unsqueeze(1)) * scales.double().unsqueeze(1)
    assert torch.equal(dequantize_q4_channels(packed, zeros.unsqueeze(1), scales.unsqueeze(1)).double(), by_hand)
    error = (by_hand - x).abs() * valid[:, :, None, None]
    assert (error <= half_step(x, valid).unsqueeze(1)).all()
    assert error.max() > half_step(x, valid).min() / 20  # a quantization happened


def q4_cache(num_blocks=8, block_size=4, kv_heads=2, head_dim=16, staging_slots=2):
    return allocate_kv_cache("q4", torch.float32, 1, num_blocks, block_size, kv_heads, head_dim, "cpu",
                             staging_slots=staging_slots)


def write_keys(cache, table, positions, keys):
    key_cache, value_cache = cache.layer(0)
    slots = cache_slots(table, positions, cache.block_size)
    write_kv(key_cache, value_cache, slots, keys.float(), keys.float(), torch.as_tensor(list(positions)))
    return slots


def read_keys(cache, table, positions):
    slots = cache_slots(table, positions, cache.block_size)
    return read_kv(cache.layer(0)[0], slots, torch.float64, torch.as_tensor(list(positions)))


def expected_block(keys_block, head_dim):
    """The float64 bound of a full block [rows, heads, d] as stored: rotated, half a step per element, rotated back
    (each (token, head) error vector keeps its length): the bound on each read vector's error norm."""
    rotated = (keys_block @ rotation(head_dim).double()).unsqueeze(0)
    half = half_step(rotated, torch.ones(1, keys_block.shape[0], dtype=torch.bool))[0]  # [heads, 1]
    return half.squeeze(-1) * head_dim**0.5 * (1 + 1e-5)


def test_a_block_being_filled_is_exact_until_its_last_row_then_quantized_whole():
    cache, table = q4_cache(), [5, 2]
    keys = random_keys((6, 2, 16), seed=3)
    for position in range(3):  # decode steps: one row at a time into block 5
        write_keys(cache, table, [position], keys[position : position + 1])
        assert torch.equal(read_keys(cache, table, range(position + 1)), keys[: position + 1].float().double())
        assert not cache.key_codes[0, 5].any() and not cache.key_scales[0, 5].any()  # nothing quantized yet
    write_keys(cache, table, [3, 4], keys[3:5])  # the last row of block 5 and the first of block 2
    read = read_keys(cache, table, range(5))
    assert cache.tables[0].block_slot == {2: cache.tables[0].block_slot[2]}  # block 5 left its staging slot
    error = (read[:4] - keys[:4]).norm(dim=-1)
    assert (error <= expected_block(keys[:4], 16)).all() and error.max() > 0
    assert torch.equal(read[4], keys[4].float().double())  # block 2's first row: staged, exact
    # block 5's codes are those of its four rows quantized at once (not of the rows as they arrived)
    packed, zeros, scales = quantize_q4_channels((keys[:4].float() @ rotation(16)).unsqueeze(0),
                                                 torch.ones(1, 4, dtype=torch.bool))
    assert torch.equal(cache.key_codes[0, 5], packed[0]) and torch.equal(cache.key_zeros[0, 5], zeros[0])


def test_a_full_block_shared_by_the_prefix_cache_is_never_quantized_again():
    cache = q4_cache()
    keys = random_keys((14, 2, 16), seed=4)
    write_keys(cache, [1, 6, 3], range(10), keys[:10])  # sequence A: blocks 1 and 6 full, 3 being filled
    stored = [t[0, [1, 6]].clone() for t in (cache.key_codes, cache.key_zeros, cache.key_scales)]
    before = read_keys(cache, [1, 6], range(8))
    # sequence B shares A's two full blocks (a prefix-cache hit) and writes only past them, into block 0
    write_keys(cache, [1, 6, 0], range(8, 12), keys[10:14])
    write_keys(cache, [1, 6, 0, 4], [12], keys[:1])
    after = [t[0, [1, 6]] for t in (cache.key_codes, cache.key_zeros, cache.key_scales)]
    assert all(torch.equal(a, b) for a, b in zip(stored, after))
    assert torch.equal(read_keys(cache, [1, 6], range(8)), before)


def test_a_rolled_back_speculative_tail_is_rewritten_correctly():
    cache, table = q4_cache(), [3]
    keys = random_keys((6, 2, 16), seed=5)
    write_keys(cache, table, [0, 1], keys[:2])
    # drafts inside the block: rows 2 (kept) and 3 (rejected) fill it, so it is quantized
    write_keys(cache, table, [2, 3], keys[2:4])
    kept = read_keys(cache, table, range(3))
    # the target rewrites row 3 with its own token: the block's kept rows come back from their dequantized values
    write_keys(cache, table, [3], keys[5:6])
    rows = torch.cat((kept, keys[5:6].float().double()))
    read = read_keys(cache, table, range(4))
    assert ((read - rows).norm(dim=-1) <= expected_block(rows, 16)).all()
    # rolled back inside a block still being filled: the rewritten row is exact, the kept ones untouched
    cache, table = q4_cache(), [3]
    write_keys(cache, table, [0, 1, 2], keys[:3])
    write_keys(cache, table, [1, 2], keys[4:6])
    assert torch.equal(read_keys(cache, table, range(3)),
                       torch.cat((keys[:1], keys[4:6])).float().double())


def test_staging_slots_running_out_quantize_the_oldest_block_and_stay_correct():
    cache = q4_cache(staging_slots=1)
    keys = random_keys((6, 2, 16), seed=6)
    write_keys(cache, [2], range(3), keys[:3])  # block 2 staged
    write_keys(cache, [7], range(2), keys[3:5])  # block 7 takes the only slot: block 2 quantized as it stands
    assert cache.tables[0].block_slot == {7: 0}
    read = read_keys(cache, [2], range(3))
    assert ((read - keys[:3]).norm(dim=-1) <= expected_block(keys[:3], 16)).all() and read.ne(keys[:3]).any()
    write_keys(cache, [2], [3], keys[5:6])  # block 2 goes on: its rows come back dequantized, then it is full
    rows = torch.cat((read, keys[5:6].float().double()))
    assert ((read_keys(cache, [2], range(4)) - rows).norm(dim=-1) <= expected_block(rows, 16)).all()
    assert torch.equal(read_keys(cache, [7], range(2)), keys[3:5].float().double())  # still staged, exact


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
    # the full blocks' codes are those of the keys before RoPE (rotated), each block quantized at once
    for block, rows in ((5, slice(0, 4)), (2, slice(4, 8))):
        packed, zeros, _ = quantize_q4_channels((before[rows].float() @ rotation(16)).unsqueeze(0),
                                                torch.ones(1, 4, dtype=torch.bool))
        assert torch.equal(cache.key_codes[0, block], packed[0]) and torch.equal(cache.key_zeros[0, block], zeros[0])
    read = read_keys(cache, table, range(10))
    # RoPE turns each pair of channels: an error vector keeps its length, so the bound before RoPE holds after it
    for rows in (slice(0, 4), slice(4, 8)):
        error = (read[rows] - after[rows]).norm(dim=-1)
        assert (error <= expected_block(before[rows], 16) + 1e-5).all() and error.max() > 1e-3
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
    """The GPU's gathered prefill attention reads q4 keys before RoPE at the positions the CPU reference does: both
    float32, so the two differ only where float rounding moves a code (a step of one key), far under the q4 bound."""
    import copy

    model = make_tiny_llama(head_dim=64, seed=4)
    ids = torch.randint(3, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(3))
    cpu = ModelRunner(model, num_blocks=12, block_size=4, kv_cache="q4").prompt_logits(ids)
    gpu = ModelRunner(copy.deepcopy(model).cuda(), num_blocks=12, block_size=4, kv_cache="q4").prompt_logits(ids)
    assert (gpu.cpu() - cpu).abs().max() <= 0.02 * cpu.abs().max()
