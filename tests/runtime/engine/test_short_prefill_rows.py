"""Short chunks as decode rows (ModelRunner's short_prefill_rows): a step whose chunks each bring a few tokens (a
prefix-cache hit's new tokens, a speculative verification) runs one decode-step row per token. On the CPU (float32,
tiny random models, the eager decode step) its logits and cache writes equal the module path's, sliding windows
included; a prefix hit's and a speculating engine's greedy output equal plain decoding's; long chunks, q4 caches
and the engine's CPU default keep their own paths."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PREFIX = [1] + list(range(30, 45))  # 16 tokens: four full blocks of 4, cached for later requests


def engine_with_rows(model, rows: int, **settings) -> Engine:
    config = dict(block_size=4, num_blocks=96, max_num_seqs=4, fast_decode=True, short_prefill_rows=rows)
    config.update(settings)
    return Engine(model, None, EngineConfig(**config))


def prefix_hit_chunks(engine: Engine, suffixes: list[list[int]]):
    """The prefix run once (its blocks cached), then requests of prefix + each suffix queued and scheduled: their
    chunks, each the suffix's tokens after the cached prefix."""
    engine.generate(PREFIX + [50], SamplingParams(max_tokens=1, temperature=0))
    for suffix in suffixes:
        engine.add_request(PREFIX + suffix, GREEDY)
    chunks = engine.scheduler.schedule()
    assert [chunk.num_tokens for chunk in chunks] == [len(s) for s in suffixes], "the prefix was a cache hit"
    return chunks


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma"])
def test_short_chunks_as_decode_rows_equal_the_module_path(family, build_family):
    # mistral's window of 4 is shorter than the chunks: each row sees only its own window of the rows before it
    engine = engine_with_rows(build_family(family, seed=11), rows=8)
    runner = engine.runner
    assert runner.decode_step is not None, runner.decode_step_reason
    chunks = prefix_hit_chunks(engine, [[60, 61, 62, 63, 64], [70, 71, 72]])
    before = runner.cache.key.clone(), runner.cache.value.clone()
    expected = runner.execute_modules(chunks)
    expected_cache = runner.cache.key.clone(), runner.cache.value.clone()
    runner.cache.key.copy_(before[0]), runner.cache.value.copy_(before[1])
    steps = runner.short_prefill_steps
    got = runner.execute(chunks)
    assert runner.short_prefill_steps == steps + 1, "the step ran as decode rows"
    assert got.shape == expected.shape == (2, engine.model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runner.cache.key, expected_cache[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runner.cache.value, expected_cache[1], rtol=1e-5, atol=1e-6)


def test_a_mixed_step_of_decodes_and_a_short_chunk_keeps_each_chunks_logit_rows(tiny_llama):
    engine = engine_with_rows(tiny_llama, rows=8)
    engine.add_request([1, 7, 8, 9], GREEDY)
    engine.step()  # its prefill: next step it decodes one token
    engine.add_request([1, 20, 21, 22, 23, 24], GREEDY)  # a 6-token prefill in the same step
    chunks = engine.scheduler.schedule()
    assert [chunk.num_tokens for chunk in chunks] == [1, 6]
    runner = engine.runner
    before = runner.cache.key.clone(), runner.cache.value.clone()
    expected = runner.execute_modules(chunks)
    runner.cache.key.copy_(before[0]), runner.cache.value.copy_(before[1])
    steps = runner.short_prefill_steps  # the first request's 4-token prefill ran as rows too
    got = runner.execute(chunks)
    assert runner.short_prefill_steps == steps + 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_prefix_hits_through_decode_rows_give_the_plain_engines_greedy_output(tiny_llama):
    prompts = [PREFIX + [60, 61, 62], PREFIX + [70, 71, 72, 73, 74, 75], PREFIX + [80]]
    outputs = {}
    for rows in (0, 8):
        engine = engine_with_rows(tiny_llama, rows=rows)
        outputs[rows] = [engine.generate(prompt, GREEDY)[0].token_ids for prompt in prompts]  # one at a time
        assert engine.stats().prefix_hit_requests == len(prompts) - 1
        assert (engine.runner.short_prefill_steps > 0) == (rows > 0)
    assert outputs[8] == outputs[0]


def test_speculative_verification_through_decode_rows_equals_plain_greedy(tiny_llama):
    prompt = [1] + [5, 6, 7, 8] * 6  # repetitive: prompt lookup proposes drafts
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = engine_with_rows(tiny_llama, rows=0).generate(prompt, params)[0].token_ids
    engine = engine_with_rows(tiny_llama, rows=8, speculative="ngram")
    assert engine.generate(prompt, params)[0].token_ids == plain
    assert engine.stats().speculation["ngram"]["drafted"] > 0
    assert engine.runner.short_prefill_steps > 0, "verification steps ran as decode rows"


def test_long_chunks_and_q4_caches_keep_their_own_paths(tiny_llama):
    engine = engine_with_rows(tiny_llama, rows=4)
    engine.generate(PREFIX + [60, 61, 62, 63, 64, 65], GREEDY)  # a 22-token prefill, no hit: over the cap
    assert engine.runner.short_prefill_steps == 0
    q4 = engine_with_rows(tiny_llama, rows=8, kv_cache="q4", block_size=None)
    assert q4.runner.short_prefill_rows == 0, "q4 stages one block per sequence: one row per sequence and step"


def test_rows_over_the_context_read_bound_keep_the_prefill_path(tiny_llama, monkeypatch):
    from qtool.runtime.engine import model_runner

    # the bound at 100 context tokens read by all rows: 5 rows after the 16-token prefix read 5 x 21 = 105
    monkeypatch.setattr(model_runner, "SHORT_PREFILL_CONTEXT_READS", 100)
    engine = engine_with_rows(tiny_llama, rows=8)
    runner = engine.runner
    chunks = prefix_hit_chunks(engine, [[60, 61, 62, 63, 64]])
    steps = runner.short_prefill_steps
    runner.execute(chunks)
    assert runner.short_prefill_steps == steps, "105 reads: the module path"
    engine = engine_with_rows(tiny_llama, rows=8)
    chunks = prefix_hit_chunks(engine, [[60, 61, 62]])  # 3 x 19 = 57 reads
    steps = engine.runner.short_prefill_steps
    engine.runner.execute(chunks)
    assert engine.runner.short_prefill_steps == steps + 1


def test_the_default_is_off_on_the_cpu_and_the_setting_is_checked(tiny_llama):
    assert Engine(tiny_llama, None, EngineConfig(num_blocks=16, fast_decode=True)).runner.short_prefill_rows == 0
    with pytest.raises(QtoolError, match="short_prefill_rows"):
        EngineConfig(short_prefill_rows=-1)
