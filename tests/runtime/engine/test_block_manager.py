"""Block bookkeeping: tables grow by whole blocks, full blocks are keyed by chain hash and reused by later requests
(shared, refcounted), the last token's block is never reused, freed keyed blocks are evicted LRU only when needed."""

from __future__ import annotations

import torch

from qtool.runtime.engine.block_manager import BlockManager, chain_hash
from qtool.runtime.engine.sampling import SamplingParams
from qtool.runtime.engine.sequence import Sequence

BLOCK = 4


def seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams(), torch.Generator())


def run_prefill(manager: BlockManager, s: Sequence) -> None:
    """Admit s with whatever prefix is cached, give it blocks for all its tokens and mark them computed."""
    manager.admit(s, manager.match_prefix(s))
    manager.grow(s, s.num_tokens)
    s.num_cached_tokens = s.num_tokens
    manager.register_full_blocks(s)


def test_chain_hash_depends_on_everything_before():
    assert chain_hash(None, [1, 2]) == chain_hash(None, (1, 2))
    assert chain_hash(chain_hash(None, [1, 2]), [3, 4]) != chain_hash(chain_hash(None, [9, 2]), [3, 4])


def test_tables_grow_by_whole_blocks():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    s = seq(0, range(1, 6))
    manager.grow(s, 5)
    assert len(s.block_table) == 2 and manager.num_free_blocks == 6
    manager.grow(s, 8)
    assert len(s.block_table) == 2
    assert manager.can_grow(s, 8 * BLOCK) and not manager.can_grow(s, 8 * BLOCK + 1)


def test_a_shared_prefix_is_reused_and_counted():
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    first = seq(0, list(range(1, 11)))  # blocks [1..4] [5..8] full, [9, 10] partial
    run_prefill(manager, first)
    second = seq(1, list(range(1, 9)) + [50, 51, 52])
    matched = manager.match_prefix(second)
    assert matched == first.block_table[:2]
    run_prefill(manager, second)
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    stats = manager.stats()
    assert (stats.prefix_hit_requests, stats.prefix_hit_blocks, stats.saved_prompt_tokens) == (1, 2, 8)
    assert stats.blocks_used == 4 and stats.blocks_free == 12


def test_the_block_of_the_last_token_is_never_reused():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    run_prefill(manager, seq(0, range(1, 9)))  # two full blocks
    # the same 8 tokens: the second block holds the last token, whose logits must be computed
    assert len(manager.match_prefix(seq(1, range(1, 9)))) == 1
    assert len(manager.match_prefix(seq(2, range(1, 10)))) == 2


def test_a_changed_earlier_block_breaks_the_chain():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    run_prefill(manager, seq(0, range(1, 10)))
    assert manager.match_prefix(seq(1, [99] + list(range(2, 10)))) == []


def test_freed_keyed_blocks_stay_cached_until_needed_then_go_least_recent_first():
    manager = BlockManager(num_blocks=5, block_size=BLOCK)
    old, new = seq(0, range(1, 10)), seq(1, range(101, 106))
    run_prefill(manager, old)  # 3 blocks, the first 2 keyed
    run_prefill(manager, new)  # 2 blocks, the first keyed
    manager.free(new)
    manager.free(old)  # freed later: more recent than new's block; its tail is freed before its head
    assert manager.stats().blocks_free == 5 and manager.stats().evictions == 0
    assert len(manager.match_prefix(seq(2, range(1, 10)))) == 2
    hog = seq(3, [7] * 16)
    manager.grow(hog, 16)  # 4 blocks: the 2 unkeyed ones, then new's keyed block, then old's second block
    assert manager.stats().evictions == 2
    assert manager.match_prefix(seq(4, range(101, 106))) == []
    assert len(manager.match_prefix(seq(5, range(1, 10)))) == 1


def test_a_duplicate_block_stays_unkeyed():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    a, b = seq(0, range(1, 6)), seq(1, range(1, 6))
    for s in (a, b):  # both computed at once: neither reused the other
        manager.admit(s, [])
        manager.grow(s, 5)
    for s in (a, b):
        s.num_cached_tokens = 5
        manager.register_full_blocks(s)
    assert manager.blocks[a.block_table[0]].key is not None and manager.blocks[b.block_table[0]].key is None
    manager.free(b)
    assert manager.stats().blocks_free == 6
