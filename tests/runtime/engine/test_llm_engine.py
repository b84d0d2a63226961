"""The engine end to end on a tiny llama: batched equals alone (prefills chunked), a prefix-cache hit equals a miss,
preempted and resumed equals uninterrupted, stop tokens and strings, text, timings, stats and bad settings."""

from __future__ import annotations

import pytest

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams

PROMPTS = [[1, 5, 9, 14, 3, 8, 21], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [1, 77], [1, 5, 9, 60]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)


def engine(model, tokenizer=None, **settings) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**{"block_size": 4, "num_blocks": 64, **settings}))


def ids(outputs) -> list[list[int]]:
    return [out.token_ids for out in outputs]


def test_batched_equals_alone_with_chunked_prefill(tiny_llama):
    params = [GREEDY, SEEDED, GREEDY, SEEDED]
    alone = [engine(tiny_llama).generate(p, q)[0].token_ids for p, q in zip(PROMPTS, params)]
    batched = engine(tiny_llama, max_num_batched_tokens=5)  # the 13-token prompt takes three steps
    assert ids(batched.generate(PROMPTS, params)) == alone
    assert batched.stats().steps > 10


def test_a_prefix_cache_hit_equals_a_miss_and_saves_tokens(tiny_llama):
    shared = list(range(1, 18))  # 17 tokens: four full blocks of 4
    first, second = shared + [90, 91], shared + [70]
    warm = engine(tiny_llama)
    warm.generate(first, GREEDY)
    hit = warm.generate(second, GREEDY)
    cold = engine(tiny_llama)
    miss = cold.generate(second, GREEDY)
    assert ids(hit) == ids(miss)
    assert warm.stats().prefix_hit_requests == 1 and warm.stats().saved_prompt_tokens == 16
    assert cold.stats().saved_prompt_tokens == 0


def test_preempted_and_resumed_equals_uninterrupted(tiny_llama):
    params = [GREEDY, SEEDED, GREEDY, SEEDED]
    roomy = engine(tiny_llama)
    expected = ids(roomy.generate(PROMPTS, params))
    tight = engine(tiny_llama, num_blocks=9)  # 36 slots for four sequences that grow to 53 tokens together
    assert ids(tight.generate(PROMPTS, params)) == expected
    stats = tight.stats()
    assert stats.preemptions > 0 and roomy.stats().preemptions == 0
    assert stats.blocks_used == 0 and stats.blocks_free == 9


def test_stop_token_ends_the_request_and_is_kept(tiny_llama):
    free = engine(tiny_llama).generate(PROMPTS[0], GREEDY)[0].token_ids
    stop = free[4]
    out = engine(tiny_llama).generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"


def test_text_and_stop_strings(make_tiny_llama, tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    prompt = "the quick brown fox"
    full = engine(model, tiny_tokenizer).generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert full.text == tiny_tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    assert full.prompt_ids == tiny_tokenizer(prompt)["input_ids"]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip()
    cut = engine(model, tiny_tokenizer).generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                                       stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 24


def test_timings_and_output_dict(tiny_llama):
    out = engine(tiny_llama).generate(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert 0 < out.time_to_first_token_s <= out.seconds and out.tokens_per_second > 0
    assert set(out.to_dict()) >= {"text", "token_ids", "finish_reason", "time_to_first_token_s", "tokens_per_second"}


def test_requests_stop_at_the_models_context(make_tiny_llama):
    model = make_tiny_llama(max_position_embeddings=12)
    out = engine(model).generate(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(PROMPTS[0]) + len(out.token_ids) == 12


def test_step_by_step(tiny_llama):
    eng = engine(tiny_llama)
    first = eng.add_request(PROMPTS[2], SamplingParams(max_tokens=2, temperature=0))
    second = eng.add_request(PROMPTS[3], SamplingParams(max_tokens=3, temperature=0))
    finished = []
    while eng.has_unfinished():
        finished += [out.request_id for out in eng.step()]
    assert finished == [first, second]


@pytest.mark.parametrize("settings,field", [
    (dict(block_size=0), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"), (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=4, kv_cache_bytes=1 << 20), "num_blocks and kv_cache_bytes"),
])
def test_bad_engine_settings_are_refused_in_one_line(settings, field):
    with pytest.raises(QtoolError, match=field):
        EngineConfig(**settings)


def test_cache_sized_by_bytes(tiny_llama):
    # 2 layers x 2 (k, v) x 4 slots x 2 kv heads x 16 dims x 4 bytes = 2048 bytes per block
    assert Engine(tiny_llama, None, EngineConfig(block_size=4, kv_cache_bytes=10_000)).num_blocks == 4


def test_requests_that_cannot_fit_are_refused(tiny_llama):
    eng = engine(tiny_llama, num_blocks=2)
    with pytest.raises(QtoolError, match="KV cache blocks"):
        eng.add_request(PROMPTS[0], SamplingParams(max_tokens=5))
    with pytest.raises(QtoolError, match="tokenizer"):
        eng.add_request("text", SamplingParams())
    with pytest.raises(QtoolError, match="empty"):
        eng.add_request([], SamplingParams())
