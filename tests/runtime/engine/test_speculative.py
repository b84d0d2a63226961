"""Speculative decoding: greedy output token-identical to plain greedy decode for prompt lookup and a draft model (the
model as its own draft: full acceptance; another random model: almost none), batched equals alone, limits and stops
inside an accepted run, no rejected token ever keyed for the prefix cache, acceptance stats, the adaptive length
backing off, and the refusals."""

from __future__ import annotations

import random

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.block_manager import chain_hash
from qtool.runtime.engine.drafters import prompt_lookup
from qtool.runtime.engine.speculation import MAX_PAUSE, DraftLength, Speculator

# repetitive prompts, so that prompt lookup finds matches from the first step
PROMPTS = [[1, 5, 9, 14, 3, 8, 21, 5, 9, 14, 3], [1, 40, 41, 42, 43, 40, 41, 42], [1, 77],
           [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4]]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PENALISED = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.3, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)


def engine(model, tokenizer=None, draft=None, **settings) -> Engine:
    config = EngineConfig(**{"block_size": 4, "num_blocks": 64, **settings})
    return Engine(model, tokenizer, config, draft_model=draft, draft_tokenizer=tokenizer if draft else None)


def ids(outputs) -> list[list[int]]:
    return [out.token_ids for out in outputs]


@pytest.fixture
def models(make_tiny_llama):
    """The target, and a random model of the same shape that rarely agrees with it."""
    return make_tiny_llama(seed=0), make_tiny_llama(seed=1)


def speculating(models, kind: str, **settings) -> Engine:
    model, other = models
    if kind == "ngram":
        return engine(model, speculative="ngram", **settings)
    return engine(model, draft=model if kind == "self-draft" else other, speculative="draft", **settings)


def brute_force_lookup(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n > len(tokens) - 1:
            continue
        for start in range(len(tokens) - n - 1, -1, -1):  # the most recent occurrence that ends before the last token
            if tokens[start : start + n] == tokens[-n:]:
                out = list(tokens)
                for i in range(k):
                    out.append(out[start + n + i])
                return out[len(tokens) :]
    return []


def test_prompt_lookup_against_a_brute_force_search():
    rng = random.Random(3)
    for _ in range(300):
        tokens = [rng.randrange(5) for _ in range(rng.randrange(1, 30))]
        k, max_n = rng.randrange(1, 7), rng.randrange(1, 5)
        min_n = rng.randrange(1, max_n + 1)
        assert prompt_lookup(tokens, k, max_n, min_n) == brute_force_lookup(tokens, k, max_n, min_n)
    # the longest n wins over a more recent shorter match; a repeat at the end is copied on through the proposal
    assert prompt_lookup([7, 8, 9, 1, 8, 9, 2, 7, 8, 9], 2, 3, 1) == [1, 8]
    assert prompt_lookup([4, 5, 4, 5], 5, 3, 1) == [4, 5, 4, 5, 4]
    assert prompt_lookup([1, 2, 3], 4, 3, 1) == []


@pytest.mark.parametrize("kind", ["ngram", "self-draft", "other-draft"])
@pytest.mark.parametrize("settings", [{}, {"max_num_batched_tokens": 5}, {"num_blocks": 12}],
                         ids=["roomy", "chunked", "preempting"])
def test_speculative_greedy_equals_plain_greedy_batched_and_alone(models, kind, settings):
    model, _ = models
    params = [GREEDY, PENALISED, SEEDED, GREEDY]
    plain = [engine(model, **settings) for _ in PROMPTS]
    expected = [eng.generate(p, q)[0].token_ids for eng, p, q in zip(plain, PROMPTS, params)]
    batched = speculating(models, kind, **settings)
    assert ids(batched.generate(PROMPTS, params)) == expected
    alone = [speculating(models, kind, **settings) for _ in PROMPTS]
    assert [eng.generate(p, q)[0].token_ids for eng, p, q in zip(alone, PROMPTS, params)] == expected
    # every speculating step still emits the target's own token: never more target forwards than plain decoding
    assert all(spec.stats().steps <= eng.stats().steps for spec, eng in zip(alone, plain))
    stats = batched.stats()
    spec = stats.speculation["draft" if "draft" in kind else "ngram"]
    assert stats.generated_tokens == sum(len(t) for t in expected) and stats.blocks_used == 0
    assert spec["drafted"] > 0 and spec["accepted"] <= spec["drafted"]
    if kind == "self-draft":  # the model agrees with itself: every draft is accepted
        assert spec["accepted"] == spec["drafted"] and spec["acceptance_rate"] == 1.0
    if kind == "ngram":
        assert spec["accepted"] > 0 and spec["draft_forward_passes"] == 0
    if kind == "other-draft":
        assert spec["acceptance_rate"] < 0.2
    if settings.get("num_blocks"):
        assert stats.preemptions > 0


@pytest.mark.parametrize("kind", ["ngram", "self-draft"])
@pytest.mark.parametrize("kv_cache", ["q8", "q4"])
def test_speculation_over_a_quantized_cache_equals_its_plain_greedy(models, kind, kv_cache):
    """A verification chunk reads its k+1 positions' K/V back from the quantized cache, as one-token decodes do.
    q4 at these tests' 4-token blocks, so verification chunks complete blocks and rejected tails roll back into
    full ones: each query reads its own block exact and earlier blocks quantized, whichever chunk wrote them, and a
    rolled-back block is restaged from its retired slot."""
    model, _ = models
    settings = {"kv_cache": kv_cache}
    expected = [engine(model, **settings).generate(p, GREEDY)[0].token_ids for p in PROMPTS]
    batched = speculating(models, kind, **settings)
    assert ids(batched.generate(PROMPTS, GREEDY)) == expected
    assert batched.runner.cache.is_quantized
    assert batched.stats().speculation["draft" if "draft" in kind else "ngram"]["accepted"] > 0


def test_full_acceptance_takes_fewer_target_steps(models):
    model, _ = models
    plain = engine(model)
    expected = ids(plain.generate(PROMPTS[0], GREEDY))
    fast = speculating(models, "self-draft", num_speculative_tokens=3)
    assert ids(fast.generate(PROMPTS[0], GREEDY)) == expected
    # a prefill step, then each step emits up to 3 drafts + 1 (k grows to its cap after the first full round)
    assert fast.stats().steps <= 1 + -(-GREEDY.max_tokens // 4) + 1 < plain.stats().steps


@pytest.mark.parametrize("kind", ["self-draft", "ngram"])
def test_max_tokens_and_stop_tokens_inside_an_accepted_run(models, kind):
    model, _ = models
    long = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompt = PROMPTS[1]  # its reply repeats from its second token: drafts are accepted early
    free = engine(model).generate(prompt, long)[0].token_ids
    for max_tokens in range(1, 11):
        eng = speculating(models, kind)
        out = eng.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == free[:max_tokens] and out.finish_reason == "length"
        assert eng.stats().generated_tokens == max_tokens
    accepted = 0
    for stop in sorted(set(free[1:16])):
        eng = speculating(models, kind)
        out = eng.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))[0]
        assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
        assert eng.stats().generated_tokens == len(out.token_ids)
        accepted += eng.stats().speculation[eng.speculator.drafter.name]["accepted"]
    assert accepted > 0  # the stops fell inside accepted runs


@pytest.mark.parametrize("kind", ["self-draft", "ngram"])
def test_stop_strings_inside_an_accepted_run(make_tiny_llama, tiny_tokenizer, kind):
    model = make_tiny_llama(seed=1, vocab_size=len(tiny_tokenizer))  # its reply repeats readable pieces
    prompt = "the quick brown fox the quick brown fox the quick"
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = engine(model, tiny_tokenizer).generate(prompt, params)[0]
    spec = dict(speculative="ngram") if kind == "ngram" else dict(speculative="draft", draft=model)
    assert engine(model, tiny_tokenizer, **spec).generate(prompt, params)[0].token_ids == full.token_ids
    stops = sorted({full.text[i : i + 2] for i in range(len(full.text) - 1)
                    if "\ufffd" not in full.text[i : i + 2] and full.text[i : i + 2].strip()})
    assert len(stops) >= 2
    for stop in stops:
        cut_params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
        expected = engine(model, tiny_tokenizer).generate(prompt, cut_params)[0]
        out = engine(model, tiny_tokenizer, **spec).generate(prompt, cut_params)[0]
        assert (out.token_ids, out.text, out.finish_reason) == (expected.token_ids, expected.text, "stop")


def assert_keyed_blocks_match(spec: Engine, plain: Engine) -> int:
    """Every block spec keyed, plain (the same requests decoded plainly) keyed too, with the same K/V."""
    keyed = dict(spec.blocks._by_key)
    assert set(keyed) <= set(plain.blocks._by_key)
    for key, block_id in keyed.items():
        reference = plain.blocks._by_key[key]
        for ours, theirs in ((spec.runner.cache.key, plain.runner.cache.key),
                             (spec.runner.cache.value, plain.runner.cache.value)):
            torch.testing.assert_close(ours[:, block_id], theirs[:, reference], rtol=1e-5, atol=1e-5)
    return len(keyed)


def test_rejected_drafts_are_never_keyed_for_the_prefix_cache(models):
    model, _ = models
    prompt = PROMPTS[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    spec = speculating(models, "other-draft", num_speculative_tokens=3)
    plain = engine(model)
    first = spec.generate(prompt, params)[0].token_ids
    assert first == plain.generate(prompt, params)[0].token_ids
    drafted = spec.stats().speculation["draft"]
    assert drafted["drafted"] > drafted["accepted"]  # drafts were rejected
    # every keyed block holds the request's own tokens, and the K/V plain decoding computed for them
    tokens, key, keys = prompt + first, None, set()
    for start in range(0, len(tokens) - 4 + 1, 4):
        key = chain_hash(key, tokens[start : start + 4])
        keys.add(key)
    assert set(spec.blocks._by_key) <= keys
    assert assert_keyed_blocks_match(spec, plain) > 0
    # a later request sharing the whole prefix reuses it, and equals a miss
    follow = tokens[:-1] + [60]
    hit = spec.generate(follow, GREEDY)[0].token_ids
    assert spec.stats().saved_prompt_tokens >= len(tokens) - 2 * 4
    assert hit == engine(model).generate(follow, GREEDY)[0].token_ids


def test_a_stop_right_after_a_rejection_keys_no_rejected_slot(models):
    # the target's own token after a rejected draft sits in the draft's slot until its next step computes it: a
    # request that stops on that token (its last token completing a block, for some of these stops) must not key it
    model, _ = models
    for prompt in PROMPTS:
        free = engine(model).generate(prompt, GREEDY)[0].token_ids
        for stop in list(dict.fromkeys(free))[:6]:
            params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop])
            spec, plain = speculating(models, "other-draft"), engine(model)
            assert ids(spec.generate(prompt, params)) == ids(plain.generate(prompt, params))
            assert_keyed_blocks_match(spec, plain)


def test_blocks_grown_for_drafts_are_released_each_step(models):
    eng = speculating(models, "other-draft", num_speculative_tokens=4)
    for prompt in PROMPTS:
        eng.add_request(prompt, GREEDY)
    while eng.has_unfinished():
        eng.step()
        for seq in eng.scheduler.running:
            if seq.num_uncached_tokens == 1:  # decoding: no room past its tokens (the next one gets it when scheduled)
                assert len(seq.block_table) <= eng.blocks.blocks_for(seq.num_tokens)
    assert eng.stats().blocks_used == 0
    drafter = eng.speculator.drafter
    assert drafter.blocks.stats().blocks_used == 0 and not drafter._mirrors


def test_verification_accepts_the_agreeing_prefix_and_counts_it():
    from qtool.runtime.engine.drafters import NgramDrafter
    from qtool.runtime.engine.sequence import Sequence

    seq = Sequence(0, [1, 2, 3], SamplingParams(temperature=0), torch.Generator())
    speculator = Speculator(NgramDrafter(), max_draft_tokens=4)
    assert speculator.verify(seq, (5, 7, 9), [5, 7, 3, 11]) == [5, 7, 3]
    assert speculator.verify(seq, (4, 6), [4, 6, 2]) == [4, 6, 2]
    assert speculator.verify(seq, (8,), [1, 9]) == [1]
    stats = speculator.stats()
    assert (stats.drafted, stats.accepted, stats.rounds) == (6, 4, 3)
    assert stats.acceptance_rate == pytest.approx(4 / 6)


def test_draft_length_grows_on_acceptance_and_backs_off_on_rejection():
    length = DraftLength(max_tokens=5)
    length.record(5, 2)
    assert length.wanted() == 3  # one more than accepted
    length.record(3, 3)
    assert length.wanted() == 4
    # zero acceptance: the drafted tokens over many steps stay a small fraction of the steps
    drafted, steps = 0, 400
    for _ in range(steps):
        k = length.wanted()
        if k:
            drafted += k
            length.record(k, 0)
    assert drafted < steps // 10
    assert length.next_pause == MAX_PAUSE


def test_zero_acceptance_costs_no_extra_target_steps_and_few_draft_passes(models):
    model, _ = models
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    plain = engine(model)
    expected = ids(plain.generate(PROMPTS[2], params))
    spec = speculating(models, "other-draft", num_speculative_tokens=4)
    assert ids(spec.generate(PROMPTS[2], params)) == expected
    stats = spec.stats().speculation["draft"]
    assert stats["accepted"] == 0  # the constructed case: this draft model never agrees here
    # a rejected round still emits the target's token: never more target forwards than plain decoding
    assert spec.stats().steps == plain.stats().steps
    # the draft model ran in few steps: drafting paused, with growing pauses, after the first rejections
    assert stats["draft_forward_passes"] < params.max_tokens // 8
    assert stats["drafted"] < params.max_tokens // 8


def test_sampled_requests_never_speculate(models):
    eng = speculating(models, "self-draft")
    assert ids(eng.generate(PROMPTS, SEEDED)) == ids(engine(models[0]).generate(PROMPTS, SEEDED))
    assert eng.stats().speculation["draft"]["drafted"] == 0


@pytest.mark.parametrize("settings,field", [
    (dict(speculative="medusa"), "speculative"), (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
])
def test_bad_speculative_settings_are_refused_in_one_line(settings, field):
    with pytest.raises(QtoolError, match=field):
        EngineConfig(**settings)


def test_draft_models_that_cannot_serve_are_refused(make_tiny_llama, make_tiny_tokenizer, build_family):
    model = make_tiny_llama()
    with pytest.raises(QtoolError, match="needs a draft model"):
        engine(model, speculative="draft")
    with pytest.raises(QtoolError, match="speculative='draft'"):
        engine(model, draft=model, speculative="ngram")
    with pytest.raises(QtoolError, match="vocabulary has 300 ids"):
        engine(model, draft=make_tiny_llama(vocab_size=300), speculative="draft")
    with pytest.raises(QtoolError, match="draft model: the engine does not run model type 'phi'"):
        engine(model, draft=build_family("phi"), speculative="draft")
    ours, theirs = make_tiny_tokenizer(vocab_size=300), make_tiny_tokenizer(vocab_size=280)
    tokenized = make_tiny_llama(vocab_size=300)
    with pytest.raises(QtoolError, match="tokenizer differs"):
        Engine(tokenized, ours, EngineConfig(block_size=4, num_blocks=8, speculative="draft"), draft_model=tokenized,
               draft_tokenizer=theirs)


def test_an_abort_releases_the_draft_state(models):
    eng = speculating(models, "self-draft")
    request = eng.add_request(PROMPTS[0], GREEDY)
    for _ in range(3):
        eng.step()
    assert eng.speculator.drafter._mirrors
    eng.abort_request(request)
    assert not eng.speculator.drafter._mirrors and eng.speculator.drafter.blocks.stats().blocks_used == 0
    assert not eng.has_unfinished()
