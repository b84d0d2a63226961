"""Continuous batching without a model: the token budget per step (decodes first, prefills chunked), the cap on
running sequences, preemption by recompute when blocks run out, and finished sequences freeing their blocks."""

from __future__ import annotations

import torch

from qtool.runtime.engine.block_manager import BlockManager
from qtool.runtime.engine.sampling import SamplingParams
from qtool.runtime.engine.scheduler import Scheduler
from qtool.runtime.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def make(num_blocks=32, max_num_seqs=8, budget=16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_num_seqs, budget)


def seq(seq_id: int, length: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, [1 + (seq_id * 31 + i) % 97 for i in range(length)], SamplingParams(max_tokens=max_tokens),
                    torch.Generator())


def step(scheduler: Scheduler, token: int = 5) -> list[tuple[int, int]]:
    """One schedule + update with `token` sampled wherever a chunk samples; (seq_id, tokens) per chunk."""
    chunks = scheduler.schedule()
    scheduler.update(chunks, [token] * sum(c.samples for c in chunks))
    scheduler.retire_finished()
    return [(c.seq.seq_id, c.num_tokens) for c in chunks]


def test_prefills_are_chunked_to_the_token_budget():
    scheduler = make(budget=6)
    scheduler.add(seq(0, 10))
    scheduler.add(seq(1, 3))
    assert step(scheduler) == [(0, 6)]
    assert step(scheduler) == [(0, 4), (1, 2)]  # 0's prefill ends and samples; 1 starts in what is left
    assert step(scheduler) == [(0, 1), (1, 1)]  # decodes first, then 1's last prompt token


def test_decodes_come_before_a_running_prefill():
    scheduler = make(budget=4)
    scheduler.add(seq(0, 2))
    scheduler.add(seq(1, 12))
    assert step(scheduler) == [(0, 2), (1, 2)]
    assert step(scheduler) == [(0, 1), (1, 3)]


def test_running_sequences_are_capped():
    scheduler = make(max_num_seqs=2, budget=64)
    for i in range(3):
        scheduler.add(seq(i, 3))
    assert [sid for sid, _ in step(scheduler)] == [0, 1]
    assert len(scheduler.waiting) == 1


def test_finished_sequences_free_their_blocks():
    scheduler = make(budget=64)
    s = seq(0, 5, max_tokens=2)
    scheduler.add(s)
    step(scheduler)
    step(scheduler)
    assert s.status is SequenceStatus.FINISHED and s.finish_reason == "length" and s.output_ids == [5, 5]
    assert not scheduler.has_unfinished()
    assert scheduler.blocks.stats().blocks_used == 0 and s.block_table == []


def test_out_of_blocks_preempts_the_latest_and_resumes_it_later():
    scheduler = make(num_blocks=4, budget=64)  # 16 slots: two sequences of 4 + 8 tokens cannot both fit
    first, second = seq(0, 4, max_tokens=8), seq(1, 4, max_tokens=8)
    scheduler.add(first)
    scheduler.add(second)
    steps = [step(scheduler, token=7) for _ in range(40) if scheduler.has_unfinished()]
    assert scheduler.num_preemptions >= 1
    assert first.output_ids == [7] * 8 and second.output_ids == [7] * 8  # nothing lost
    # while first ran, second was out; when it came back it recomputed its prompt and outputs so far
    resumed = [chunks for chunks in steps if (1, 1) not in chunks and any(sid == 1 and n > 1 for sid, n in chunks)]
    assert len(resumed) >= 2  # its first prefill and at least one recompute
    assert scheduler.blocks.stats().blocks_used == 0


def test_a_preempted_sequence_waits_at_the_front_and_no_new_request_overtakes_it():
    scheduler = make(num_blocks=3, budget=64)
    a, b, c = seq(0, 4, max_tokens=6), seq(1, 4, max_tokens=6), seq(2, 4, max_tokens=6)
    for s in (a, b):
        scheduler.add(s)
    step(scheduler)  # a: 1 block... both admitted with 1 block each
    scheduler.add(c)
    while b.status is not SequenceStatus.PREEMPTED and scheduler.has_unfinished():
        step(scheduler)
    assert scheduler.waiting[0] is b and c in scheduler.waiting


def test_token_slice_spans_prompt_and_output():
    s = seq(0, 4)
    s.output_ids = [90, 91, 92]
    assert [s.token_slice(a, b) for a, b in [(0, 7), (2, 6), (5, 7), (4, 5)]] == [
        s.token_ids[a:b] for a, b in [(0, 7), (2, 6), (5, 7), (4, 5)]]
