"""Logprobs from the engine: each generated token's log-probability and its top alternatives equal those of
transformers' own forward logits over the same tokens (float32, batched, chunked prefill, sampled and greedy, the
repetition penalty and temperature not applied), unchanged by preemption and by speculative decoding, streamed
step by step before the step's text, absent (and the tokens unchanged) when not asked; token bytes exact."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.sampling import token_logprobs
from qtool.runtime.token_logprobs import TokenTexts

PROMPTS = [[1, 5, 9, 14, 3, 8, 21], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [1, 77], [1, 5, 9, 60]]
ATOL = 2e-5  # the engine's attention and the model's own differ by float32 rounding


def engine(model, tokenizer=None, draft=None, **settings) -> Engine:
    config = EngineConfig(**{"block_size": 4, "num_blocks": 64, **settings})
    return Engine(model, tokenizer, config, draft_model=draft, draft_tokenizer=tokenizer if draft else None)


def mixed_params(logprobs=(5, 0, 20, 3)) -> list[SamplingParams]:
    """A sampled request under a repetition penalty, a greedy one, a hot one with top-k and min-p, a nucleus one."""
    return [SamplingParams(max_tokens=9, temperature=0.7, repetition_penalty=1.3, seed=3, ignore_eos=True,
                           logprobs=logprobs[0]),
            SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, logprobs=logprobs[1]),
            SamplingParams(max_tokens=8, temperature=2.5, top_k=7, min_p=0.05, seed=4, ignore_eos=True,
                           logprobs=logprobs[2]),
            SamplingParams(max_tokens=6, temperature=1.0, top_p=0.8, seed=5, ignore_eos=True, logprobs=logprobs[3])]


def reference_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of transformers' forward logits at the positions that chose each output token, float64."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].double()
    return logits[len(prompt) - 1 : -1].log_softmax(dim=-1)


def assert_logprobs_match(model, out, k: int) -> None:
    reference = reference_logprobs(model, out.prompt_ids, out.token_ids)
    assert [entry.token_id for entry in out.logprobs] == out.token_ids
    for position, entry in enumerate(out.logprobs):
        row = reference[position]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=ATOL)
        assert len(entry.top) == k
        top_ids = [token for token, _ in entry.top]
        values = torch.tensor([logprob for _, logprob in entry.top], dtype=torch.float64)
        assert len(set(top_ids)) == k
        # the alternatives are the row's k most likely (compared by value: near-ties may order either way)
        torch.testing.assert_close(values, row.topk(k).values, rtol=0, atol=ATOL)
        torch.testing.assert_close(values, row[top_ids], rtol=0, atol=ATOL)


def test_logprobs_equal_transformers_forward_logits(make_tiny_llama):
    model = make_tiny_llama(seed=2)
    params = mixed_params()
    outputs = engine(model, max_num_batched_tokens=6).generate(PROMPTS, params)  # the 13-token prompt in 3 chunks
    for out, p in zip(outputs, params):
        assert len(out.token_ids) == p.max_tokens
        assert_logprobs_match(model, out, p.logprobs)


def test_asking_for_logprobs_changes_no_token_and_costs_nothing_otherwise(tiny_llama):
    asked = engine(tiny_llama).generate(PROMPTS, mixed_params())
    plain = engine(tiny_llama).generate(PROMPTS, mixed_params(logprobs=(None,) * 4))
    assert [out.token_ids for out in asked] == [out.token_ids for out in plain]
    assert all(out.logprobs is None for out in plain) and all(out.logprobs for out in asked)
    assert plain[0].to_dict()["logprobs"] is None
    row = asked[0].to_dict()["logprobs"][0]
    assert row["token_id"] == asked[0].token_ids[0] and len(row["top_logprobs"]) == 5


def test_preemption_keeps_the_logprobs(tiny_llama):
    params = mixed_params()
    roomy = engine(tiny_llama).generate(PROMPTS, params)
    tight_engine = engine(tiny_llama, num_blocks=8)
    tight = tight_engine.generate(PROMPTS, params)
    assert tight_engine.stats().preemptions > 0
    for a, b in zip(roomy, tight):
        assert a.token_ids == b.token_ids
        assert [e.token_id for e in a.logprobs] == [e.token_id for e in b.logprobs]
        torch.testing.assert_close(torch.tensor([e.logprob for e in b.logprobs]),
                                   torch.tensor([e.logprob for e in a.logprobs]), rtol=0, atol=ATOL)


def test_speculative_runs_give_each_token_its_own_row(make_tiny_llama):
    model = make_tiny_llama(seed=0)
    prompts = [[1, 5, 9, 14, 3, 8, 21, 5, 9, 14, 3], [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4]]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=4)
    # the model as its own draft: every draft is accepted, so most tokens come inside multi-token runs
    speculating = engine(model, draft=model, speculative="draft")
    outputs = speculating.generate(prompts, params)
    assert speculating.stats().speculation["draft"]["accepted"] > 10
    plain = engine(model).generate(prompts, params)
    for out, alone in zip(outputs, plain):
        assert out.token_ids == alone.token_ids
        assert_logprobs_match(model, out, 4)


def test_streamed_logprobs_come_before_their_text_and_add_up(make_tiny_llama, tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    running = engine(model, tiny_tokenizer)
    events = []
    request = running.add_request("the quick brown fox", SamplingParams(max_tokens=20, temperature=0.9, seed=8,
                                                                          ignore_eos=True, logprobs=2),
                                  on_text=lambda piece: events.append(("text", piece)),
                                  on_logprobs=lambda entries: events.append(("logprobs", entries)))
    done = []
    while running.has_unfinished():
        done += running.step()
    out = done[0]
    assert out.request_id == request
    streamed = [entry for kind, payload in events if kind == "logprobs" for entry in payload]
    assert streamed == out.logprobs and len(streamed) == 20
    # every text piece follows the logprobs of the tokens it came from
    seen_tokens = 0
    for kind, payload in events:
        if kind == "logprobs":
            seen_tokens += len(payload)
        else:
            covered = tiny_tokenizer.decode(out.token_ids[:seen_tokens], skip_special_tokens=True)
            text_so_far = "".join(p for k, p in events[: events.index((kind, payload)) + 1] if k == "text")
            assert covered.startswith(text_so_far)
    assert "".join(p for k, p in events if k == "text") == out.text


def test_stop_ends_the_logprobs_with_the_tokens(tiny_llama):
    free = engine(tiny_llama).generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, logprobs=1,
                                                                  ignore_eos=True))[0]
    stop = free.token_ids[4]
    cut = engine(tiny_llama).generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, logprobs=1,
                                                                 stop_token_ids=[stop]))[0]
    assert cut.finish_reason == "stop" and len(cut.logprobs) == len(cut.token_ids) == cut.token_ids.index(stop) + 1
    assert cut.logprobs == free.logprobs[: len(cut.logprobs)]


def test_token_logprobs_against_float64():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 37, generator=generator) * 4
    tokens = torch.randint(0, 37, (5,), generator=generator).tolist()
    counts = [0, 3, 20, 1, 7]
    entries = token_logprobs(logits, tokens, counts)
    reference = logits.double().log_softmax(dim=1)
    for row, (entry, token, count) in enumerate(zip(entries, tokens, counts)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        order = reference[row].argsort(descending=True)[:count].tolist()
        assert [t for t, _ in entry.top] == order
        assert [v for _, v in entry.top] == pytest.approx(reference[row, order].tolist(), abs=1e-5)
    assert token_logprobs(logits[:2], tokens[:2], [0, 0])[1].top == ()


@pytest.mark.parametrize("value", [-1, 21, True, 2.0])
def test_bad_logprobs_are_refused_in_one_line(value):
    with pytest.raises(QtoolError) as caught:
        SamplingParams(logprobs=value)
    assert "logprobs" in caught.value.one_line() and "0..20" in caught.value.one_line()


def test_a_logprobs_stream_needs_a_request_that_asks(tiny_llama):
    with pytest.raises(QtoolError, match="on_logprobs"):
        engine(tiny_llama).add_request(PROMPTS[0], SamplingParams(max_tokens=2), on_logprobs=lambda entries: None)


def test_token_bytes_are_exact_where_text_is_not(tiny_tokenizer):
    texts = TokenTexts(tiny_tokenizer)
    text = "naïve café — 東京 fox"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(texts.bytes(i)) for i in ids) == text.encode("utf-8")
    # at least one token holds part of a character: its text cannot say which bytes, its bytes do
    partial = [i for i in ids if "\ufffd" in texts.text(i)]
    assert partial and all(bytes(texts.bytes(i)) != texts.text(i).encode("utf-8") for i in partial)
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert texts.text(end) == "<|im_end|>" and bytes(texts.bytes(end)) == b"<|im_end|>"
