"""The whole-tensor decode step with a q4 KV cache against the module path (CPU, float32, tiny random models): the
same logits step by step (within float32 summation order) and the same greedy tokens across block boundaries
(blocks filled by the decode step, quantized by the host after it), batches of sequences at different positions,
staging slots evicted as sequences finish and new ones start; the host's plan of a step's writes stores what
Q4CacheLayer.write stores, bit for bit, and declines the writes only the module path makes."""

from __future__ import annotations

import random

import pytest
import torch

from qtool.kernels.engine_ops_ref import rope_and_cache_q4_ref
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.attention import allocate_kv_cache, write_kv
from qtool.runtime.engine.q4_decode import finish_q4_decode, plan_q4_decode
from tests.helpers.key_rope import standard_key_rope

# float32 logits through two summation orders of the same numbers (the module path's attention per sequence, the
# decode step's over the batch); the q4 codes themselves come out equal
LOGIT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
CACHE_TENSORS = ("key_codes", "key_scales", "value_codes", "value_scales")


def recorded_logits(runner) -> list[tuple[bool, torch.Tensor]]:
    """Every execute()'s logits (and whether its chunks were all one-token decodes), as the runner returns them."""
    seen = []
    execute = runner.execute

    def recording(chunks):
        logits = execute(chunks)
        seen.append((all(chunk.num_tokens == 1 for chunk in chunks), logits.clone()))
        return logits

    runner.execute = recording
    return seen


def run_both(model, prompts, max_tokens, **config):
    """The same requests through an engine with the decode step and one on the module path: per path the greedy
    outputs, the logits of every step, and the engine."""
    results = {}
    for fast in (True, False):
        engine = Engine(model, None, EngineConfig(kv_cache="q4", fast_decode=fast, **config))
        seen = recorded_logits(engine.runner)
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
        outputs = engine.generate(prompts, params)
        results[fast] = ([out.token_ids for out in outputs], seen, engine)
    return results


def positions_decoded(prompts, max_tokens) -> list[int]:
    """The positions each request's decode steps write (its first new token comes from the prefill)."""
    return [p for prompt, n in zip(prompts, max_tokens) for p in range(len(prompt), len(prompt) + n - 1)]


@pytest.mark.parametrize("family,max_num_seqs,lengths,max_tokens", [
    ("llama", 3, [3, 9, 14], [14, 9, 12]),  # a batch of 3 at different positions, each crossing block boundaries
    # 2 running at once of 4: later requests start while others' blocks are still staged (evictions)
    ("llama", 2, [5, 2, 11, 7], [10, 6, 9, 13]),
    ("mistral", 3, [6, 13, 4], [11, 8, 10]),  # a sliding window (4) over q4 blocks
    ("qwen3", 3, [7, 3, 10], [9, 12, 7]),  # q/k norms
])
def test_the_q4_decode_step_equals_the_module_path(build_family, family, max_num_seqs, lengths, max_tokens):
    model = build_family(family, seed=13)
    rng = random.Random(sum(lengths))
    prompts = [[1] + [rng.randrange(2, model.config.vocab_size) for _ in range(n - 1)] for n in lengths]
    block_size = 4
    assert any(p % block_size == block_size - 1 for p in positions_decoded(prompts, max_tokens)), \
        "decode steps fill blocks"
    results = run_both(model, prompts, max_tokens, block_size=block_size, num_blocks=64, max_num_seqs=max_num_seqs)
    (fast_ids, fast_logits, fast), (module_ids, module_logits, modules) = results[True], results[False]
    assert fast.runner.decode_step is not None, fast.runner.decode_step_reason
    assert "q4 KV cache" in fast.runner.decode_step_reason
    assert fast.runner.fast_decode_steps == sum(decodes for decodes, _ in fast_logits) > 0
    assert modules.runner.fast_decode_steps == 0
    assert fast_ids == module_ids
    assert len(fast_logits) == len(module_logits)
    for (decodes, got), (_, expected) in zip(fast_logits, module_logits):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **LOGIT_TOLERANCE)
    got_cache, expected_cache = fast.runner.cache, modules.runner.cache
    for name in CACHE_TENSORS:  # what later steps read: the same codes, scales within a float16 step
        torch.testing.assert_close(getattr(got_cache, name).float(), getattr(expected_cache, name).float(),
                                   rtol=2e-3, atol=1e-6)
    assert (got_cache.key_codes != expected_cache.key_codes).float().mean() < 1e-3
    assert got_cache.key_codes.any(), "blocks were quantized"
    assert [vars(t) for t in got_cache.tables] == [vars(t) for t in expected_cache.tables]


def _q4_cache(staging_slots: int, num_blocks: int = 8, block_size: int = 4, layers: int = 2, kv_heads: int = 2,
              head_dim: int = 16):
    cache = allocate_kv_cache("q4", torch.float32, layers, num_blocks, block_size, kv_heads, head_dim, "cpu",
                              staging_slots=staging_slots)
    cache.key_ropes = [standard_key_rope(head_dim)] * layers
    return cache


def _state(cache) -> dict:
    tensors = {name: getattr(cache, name).clone() for name in (*CACHE_TENSORS, "key_staging", "value_staging")}
    return {**tensors, "tables": [vars(t.copy()) for t in cache.tables]}


def _decode_through_modules(cache, slots, positions, keys, values):
    """One decode step's writes as the module path makes them: write_kv per layer (keys after RoPE)."""
    rope = cache.key_ropes[0]
    for layer in range(cache.key_codes.shape[0]):
        keys_part, values_part = cache.layer(layer)
        write_kv(keys_part, values_part, slots, rope.rotate(keys[layer], positions), values[layer], positions)


def _decode_through_the_plan(cache, slots, positions, keys, values) -> bool:
    """The same writes as the decode step makes them: the host's plan, the write op per layer, the host's finish;
    or, where the plan declines, the module path's (as the runner does). Whether the plan took them."""
    plan = plan_q4_decode(cache, slots.tolist())
    if plan is None:
        _decode_through_modules(cache, slots, positions, keys, values)
        return False
    block_size = cache.block_size
    staging_rows = torch.tensor(plan.staging_slots) * block_size + positions % block_size
    cos, sin = cache.key_ropes[0].tables(positions)
    for layer in range(cache.key_codes.shape[0]):
        query = torch.zeros(len(slots), 1, cache.head_dim)
        rope_and_cache_q4_ref(query, keys[layer], values[layer], cos, sin, cos, sin, cache.rotation,
                              cache.key_staging[layer], cache.value_staging[layer], cache.value_codes[layer],
                              cache.value_scales[layer], staging_rows, slots)
    finish_q4_decode(cache, plan)
    return True


def test_the_plan_stores_what_the_module_paths_write_stores():
    """Sequences decoded token by token, more of them over time than staging slots (blocks left staged by a
    finished sequence are evicted, quantized as they stand), blocks filled, one step where a block starts in the
    slot another fills (declined: the module path's write): the cache after each step through the host's plan +
    the write op equals the cache after write_kv, bit for bit, tables included. Both paths are given the keys
    before RoPE, turned by the same float32 RoPE, so they store the same numbers."""
    gen = torch.Generator().manual_seed(4)
    block_size, layers, kv_heads, head_dim = 4, 2, 2, 16
    planned, reference = _q4_cache(2), _q4_cache(2)
    # (sequence -> its blocks); lengths grow by one per step for the sequences running in it
    schedule = [[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [1, 2], [1, 2], [2], [2, 3], [2, 3], [3, 0], [3, 0]]
    tables = {0: [0, 5], 1: [1, 6], 2: [2, 7], 3: [3, 4]}
    lengths = {seq: 0 for seq in tables}
    evictions = fills = declined = 0
    for running in schedule:
        if running == [3, 0]:
            lengths[0] = 0 if lengths[0] > 5 else lengths[0]  # sequence 0 starts again in blocks 0 and 5
        positions = torch.tensor([lengths[seq] for seq in running])
        slots = torch.tensor([tables[seq][p // block_size] * block_size + p % block_size
                              for seq, p in zip(running, positions.tolist())])
        keys = torch.randn(layers, len(running), kv_heads, head_dim, generator=gen) * 3 + 1
        values = torch.randn(layers, len(running), kv_heads, head_dim, generator=gen)
        table = planned.tables[0]
        staged = {block for block, slot in table.block_slot.items() if not table.slot_full[slot]}
        _decode_through_modules(reference, slots, positions, keys, values)
        declined += not _decode_through_the_plan(planned, slots, positions, keys, values)
        evictions += len(staged - set(planned.tables[0].block_slot))
        fills += int(((positions % block_size) == block_size - 1).sum())
        for name, expected in _state(reference).items():
            got = _state(planned)[name]
            assert (got == expected) if name == "tables" else torch.equal(got, expected), name
        for seq in running:
            lengths[seq] += 1
    assert fills >= 3 and evictions >= 1 and 1 <= declined < len(schedule) // 2, (fills, evictions, declined)


def test_the_plan_declines_the_writes_only_the_module_path_makes():
    cache = _q4_cache(1)
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 1, 2, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
    _decode_through_modules(cache, torch.tensor([0]), torch.tensor([0]), keys, values)  # block 0, row 0: staged
    _decode_through_modules(cache, torch.tensor([8]), torch.tensor([0]), keys, values)  # block 2 evicts block 0
    state = _state(cache)
    # block 0's row 0 is in its codes only: its next row would restage it from them
    assert plan_q4_decode(cache, [1]) is None
    # two sequences starting blocks in one step, one staging slot
    assert plan_q4_decode(cache, [12, 16]) is None
    assert all((got == expected) if name == "tables" else torch.equal(got, expected)
               for (name, got), expected in zip(_state(cache).items(), state.values())), "nothing changed"
    assert plan_q4_decode(cache, [9]) is not None, "block 2's own next row is the decode step's"


def test_the_engine_runs_a_declined_step_through_the_modules(make_tiny_llama):
    """More running sequences than staging slots (a runner built so: the engine gives it one slot per running
    sequence): the steps the plan declines run through the modules, the others through the decode step, and the
    greedy output is the module path's."""
    from qtool.runtime.engine.model_runner import ModelRunner

    model = make_tiny_llama(seed=6)
    prompts = [[1, 5, 9, 13, 17], [1, 40, 41], [1, 77, 78, 79, 80, 81, 82]]
    # three running at first (declined: one slot), one alone at the end (the decode step)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 6, 13)]
    outputs, decodes = {}, 0
    for fast in (True, False):
        engine = Engine(model, None, EngineConfig(kv_cache="q4", block_size=4, num_blocks=64, max_num_seqs=3))
        engine.runner = ModelRunner(model, 64, 4, kv_cache="q4", fast_decode=fast, max_num_seqs=1)
        seen = recorded_logits(engine.runner)
        outputs[fast] = [out.token_ids for out in engine.generate(prompts, params)]
        if fast:
            decodes, taken = sum(all_decodes for all_decodes, _ in seen), engine.runner.fast_decode_steps
    assert outputs[True] == outputs[False]
    assert 0 < taken < decodes, (taken, decodes)


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculation_beside_the_q4_decode_step_keeps_the_module_paths_greedy(make_tiny_llama, speculative):
    """Verification chunks (the module path's writes: blocks completed, rejected tails rolled back into retired
    slots) interleaved with one-token steps through the decode step (speculation paused, or nothing drafted): the
    greedy output of plain decoding on the module path."""
    model = make_tiny_llama(seed=0)
    draft = make_tiny_llama(seed=1) if speculative == "draft" else None  # rarely agrees: rejections, pauses
    prompts = [[1, 5, 9, 14, 3, 8, 21, 5, 9, 14, 3], [1, 40, 41, 42, 43, 40, 41, 42], [1, 77]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    config = dict(kv_cache="q4", block_size=4, num_blocks=64)
    expected = [out.token_ids for out in Engine(model, None, EngineConfig(fast_decode=False, **config))
                .generate(prompts, params)]
    engine = Engine(model, None, EngineConfig(fast_decode=True, speculative=speculative, **config),
                    draft_model=draft)
    assert [out.token_ids for out in engine.generate(prompts, params)] == expected
    assert engine.runner.fast_decode_steps > 0
    assert engine.stats().speculation[speculative]["drafted"] > 0, "verification chunks ran too"
