"""A model whose every layer has a sliding window keeps a bounded cache: blocks wholly before the window of a running
sequence's next token are released (table entries RELEASED, refcounts dropped, keyed blocks left cached for others),
so a long generation holds at most ceil(W / block_size) + 2 blocks, its greedy output still equal to transformers'
generate; the prefix cache still hits and stays exact; a model mixing full-attention layers keeps every block."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.block_manager import RELEASED, BlockManager, cache_window
from qtool.runtime.engine.sampling import SamplingParams as Params
from qtool.runtime.engine.sequence import Sequence

BLOCK = 4
NEW_TOKENS = 40
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)


def windowed_mistral(build_family, window: int, seed: int = 0):
    # no end-of-sequence token, so every generation runs its full length in both engine and generate
    return build_family("mistral", seed=seed, sliding_window=window, eos_token_id=None)


def run_alone(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    """(new ids, the most blocks in use after any step) of one request run by itself."""
    request = engine.add_request(prompt, params)
    peak, output = 0, None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request:
                output = out
        peak = max(peak, engine.stats().blocks_used)
    return output.token_ids, peak


def test_the_cache_window_needs_every_layer_windowed(build_family):
    assert cache_window([4, 6]) == 6 and cache_window([4, None]) is None and cache_window([]) is None
    assert Engine(windowed_mistral(build_family, 4), None, EngineConfig(num_blocks=8)).blocks.sliding_window == 4
    mixed = build_family("qwen2")  # max_window_layers=1: the second layer attends to everything
    assert Engine(mixed, None, EngineConfig(num_blocks=8)).blocks.sliding_window is None


@pytest.mark.parametrize("window", [4, 6, 9])
def test_a_long_generation_holds_a_bounded_cache_and_matches_generate(build_family, reference_greedy, window):
    model = windowed_mistral(build_family, window, seed=window)
    prompt = [1, 17, 33, 5, 91, 12, 64]
    bound = math.ceil(window / BLOCK) + 2
    # a cache of exactly the bound, and a token budget that chunks the prompt: a sequence that needed more would
    # preempt itself and never finish
    engine = Engine(model, None, EngineConfig(block_size=BLOCK, num_blocks=bound, max_num_batched_tokens=BLOCK))
    tokens, peak = run_alone(engine, prompt)
    assert tokens == reference_greedy(model, prompt, NEW_TOKENS, None)
    assert len(tokens) == NEW_TOKENS and peak <= bound < math.ceil((len(prompt) + NEW_TOKENS) / BLOCK)
    assert engine.stats().preemptions == 0
    # a reply may run to the model's context in this cache (the chat path falls back to generate beyond capacity)
    assert engine.capacity_tokens == model.config.max_position_embeddings > bound * BLOCK


def test_a_mixed_model_keeps_every_block(build_family, reference_greedy):
    model = build_family("qwen2", eos_token_id=None)
    prompt = [1, 17, 33, 5, 91, 12, 64]
    engine = Engine(model, None, EngineConfig(block_size=BLOCK, num_blocks=64))
    tokens, peak = run_alone(engine, prompt, SamplingParams(max_tokens=20, temperature=0))
    assert tokens == reference_greedy(model, prompt, 20, None)
    assert peak == math.ceil((len(prompt) + 20 - 1) / BLOCK)  # the last token's K/V is never computed
    assert engine.capacity_tokens == 64 * BLOCK


def test_the_prefix_cache_still_hits_and_stays_exact(build_family, reference_greedy):
    model = windowed_mistral(build_family, 5, seed=3)
    shared = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]  # three full blocks, longer than the window
    prompts = [shared + [7, 8], shared + [9], shared + [7, 8]]
    expected = [reference_greedy(model, p, NEW_TOKENS, None) for p in prompts]
    engine = Engine(model, None, EngineConfig(block_size=BLOCK, num_blocks=32, max_num_batched_tokens=6))
    assert [run_alone(engine, p)[0] for p in prompts] == expected
    stats = engine.stats()
    # the first request released the shared blocks as it went; keyed, they stayed cached for the next ones
    assert stats.prefix_hit_requests == 2 and stats.saved_prompt_tokens >= 2 * 3 * BLOCK
    # all at once: shared blocks referenced by one sequence and released by another
    together = Engine(model, None, EngineConfig(block_size=BLOCK, num_blocks=32, max_num_batched_tokens=6))
    assert [out.token_ids for out in together.generate(prompts, GREEDY)] == expected


def test_preempted_and_resumed_equals_uninterrupted(build_family, reference_greedy):
    model = windowed_mistral(build_family, 4, seed=5)
    prompts = [[1, 5, 9, 14, 3, 22], [1, 77, 78, 79, 80, 81, 82], [1, 30, 31]]
    expected = [reference_greedy(model, p, NEW_TOKENS, None) for p in prompts]
    engine = Engine(model, None, EngineConfig(block_size=BLOCK, num_blocks=3, max_num_batched_tokens=BLOCK))
    assert [out.token_ids for out in engine.generate(prompts, GREEDY)] == expected
    assert engine.stats().preemptions > 0, "the test needs a cache too small for three sequences at once"


def sequence(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, list(tokens), Params(), torch.Generator())


def test_a_released_block_shared_with_another_sequence_stays_with_it():
    manager = BlockManager(num_blocks=12, block_size=BLOCK, sliding_window=4)
    tokens = list(range(1, 14))  # 13 tokens: three full blocks and one partial

    def prefill(seq):
        manager.admit(seq, manager.match_prefix(seq))
        manager.grow(seq, seq.num_tokens)
        seq.num_cached_tokens = seq.num_tokens
        manager.register_full_blocks(seq)

    first = sequence(0, tokens)
    prefill(first)
    shared = first.block_table[:3]
    # the second matches two blocks; its next query (position 8) reads positions 5..8, so it takes no reference
    # on the first block
    second = sequence(1, tokens[:8] + [99, 98])
    prefill(second)
    assert second.block_table[:2] == [RELEASED, shared[1]] and manager.stats().prefix_hit_requests == 1
    assert [manager.blocks[b].ref_count for b in shared] == [1, 2, 1]
    # with 13 tokens cached, the first one's next query (position 13) reads positions 10..13: blocks 0 and 1 go
    assert manager.release_out_of_window(first) == 2 and first.block_table[:2] == [RELEASED, RELEASED]
    assert [manager.blocks[b].ref_count for b in shared] == [0, 1, 1]  # block 1 stays with the second one
    assert manager.release_out_of_window(first) == 0  # nothing more until the sequence moves on
    assert manager.num_free_blocks == 12 - 4  # the unreferenced block counts as free...
    third = sequence(2, tokens[:12] + [5, 6])
    assert manager.match_prefix(third) == shared  # ...and is still found by a request with that prefix
    assert manager.can_admit(shared, third.num_tokens)
    manager.admit(third, shared)
    assert third.block_table == [RELEASED, RELEASED, shared[2]]
    assert [manager.blocks[b].ref_count for b in shared] == [0, 1, 2] and manager.num_free_blocks == 8
    # keys go on past the released blocks: the first one's fourth block gets the key a fresh chain gives it
    for token in (14, 15, 16):
        first.append_token(token)
    manager.grow(first, first.num_tokens)
    first.num_cached_tokens = first.num_tokens
    manager.register_full_blocks(first)
    probe = sequence(3, tokens + [14, 15, 16, 17])
    assert manager.match_prefix(probe) == shared + [first.block_table[3]]
    for seq in (first, second, third):
        manager.free(seq)
    assert manager.stats().blocks_used == 0 and manager.num_free_blocks == 12
