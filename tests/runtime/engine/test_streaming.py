"""Streaming from the engine: per request, the pieces handed to on_text concatenate to the final text and every
prefix streamed is a prefix of it (so a stop string, or its start, never leaks), for greedy and seeded requests, with
and without stop strings, several at once with chunked prefills and preemption."""

from __future__ import annotations

import pytest

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams

PROMPTS = ["the quick brown fox", "what is the capital of france", "the lazy dog", "old city river"]
GREEDY = dict(max_tokens=20, temperature=0, ignore_eos=True)
SEEDED = dict(max_tokens=20, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


@pytest.fixture
def model(make_tiny_llama, tiny_tokenizer):
    return make_tiny_llama(seed=3, vocab_size=len(tiny_tokenizer))


def run_streamed(model, tokenizer, params: list[SamplingParams], **config):
    engine = Engine(model, tokenizer, EngineConfig(**{"block_size": 4, "num_blocks": 64, **config}))
    streams: dict[int, list[str]] = {}

    def collector(pieces: list[str], request: int):
        def on_text(piece: str) -> None:
            assert piece  # no empty calls
            pieces.append(piece)
        return on_text

    ids = []
    for prompt, p in zip(PROMPTS, params):
        pieces: list[str] = []
        ids.append(engine.add_request(prompt, p, on_text=collector(pieces, len(ids))))
        streams[ids[-1]] = pieces
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] = out
            # everything streamed by the time the request finishes
            assert "".join(streams[out.request_id]) == out.text
    return [outputs[i] for i in ids], [streams[i] for i in ids]


def assert_streams_are_the_text(outputs, streams, params):
    for out, pieces, p in zip(outputs, streams, params):
        assert "".join(pieces) == out.text
        for end in range(len(pieces)):
            prefix = "".join(pieces[: end + 1])
            assert out.text.startswith(prefix) and not any(stop in prefix for stop in p.stop)


def test_streams_equal_the_final_text_without_stop_strings(model, tiny_tokenizer):
    params = [SamplingParams(**GREEDY), SamplingParams(**SEEDED), SamplingParams(**GREEDY), SamplingParams(**SEEDED)]
    outputs, streams = run_streamed(model, tiny_tokenizer, params, max_num_batched_tokens=6)
    assert_streams_are_the_text(outputs, streams, params)
    assert all(len(pieces) > 3 for pieces in streams)  # streamed as it formed, not at the end


def test_streams_with_stop_strings_hit_and_missed(model, tiny_tokenizer):
    plain = [SamplingParams(**GREEDY), SamplingParams(**SEEDED), SamplingParams(**GREEDY), SamplingParams(**SEEDED)]
    full, _ = run_streamed(model, tiny_tokenizer, plain)
    params = []
    for out, p in zip(full, plain):
        middle = len(out.text) // 2
        hit = out.text[middle : middle + 3]
        # a stop string whose start appears but which never completes: held back, then released
        missed = out.text[middle - 4 : middle - 2] + "\x00"
        params.append(SamplingParams(**{**p.__dict__, "stop": (hit, missed)}))
    outputs, streams = run_streamed(model, tiny_tokenizer, params, num_blocks=12)  # tight: some preemption
    assert_streams_are_the_text(outputs, streams, params)
    for out, before in zip(outputs, full):
        assert out.finish_reason == "stop" and before.text.startswith(out.text) and len(out.text) < len(before.text)


def test_streaming_needs_a_tokenizer(tiny_llama):
    with pytest.raises(QtoolError, match="tokenizer"):
        Engine(tiny_llama, None, EngineConfig(block_size=4, num_blocks=8)).add_request([1, 2], on_text=print)


def test_an_aborted_request_stops_streaming_and_frees_its_blocks(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, EngineConfig(block_size=4, num_blocks=32))
    pieces: list[str] = []
    request = engine.add_request(PROMPTS[0], SamplingParams(**GREEDY), on_text=pieces.append)
    engine.step()
    engine.step()
    engine.abort_request(request)
    streamed = len(pieces)
    assert not engine.has_unfinished() and engine.step() == [] and len(pieces) == streamed
    assert engine.stats().blocks_used == 0
