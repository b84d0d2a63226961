"""Replies for `qtool run`: the engine path token-identical to transformers' generate (greedy, several families, stop
strings), the fallback with its one log line, streaming, time to first token, seeds that do not leak, the context
limit, a chat's second turn served from the prefix cache, and an interrupted reply."""

from __future__ import annotations

import logging

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import EngineConfig
from qtool.runtime.generate import GenerationSettings, generate
from qtool.runtime.reply import ReplyGenerator, reply

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0)
CHAT = [{"role": "system", "content": "the quick brown fox jumps over the lazy dog"},
        {"role": "user", "content": "what is the capital of france"}]


@pytest.fixture
def model(make_tiny_llama, tokenizer):
    return make_tiny_llama(seed=5, vocab_size=len(tokenizer))


def streamed(function, *args):
    pieces: list[str] = []
    result = function(*args, on_text=pieces.append)
    assert "".join(pieces) == result.text
    return result


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mixtral"])
def test_greedy_engine_replies_equal_generate(family, build_family, tokenizer):
    model = build_family(family, seed=1, vocab_size=len(tokenizer), max_position_embeddings=128)
    replies = ReplyGenerator(model, tokenizer)
    assert replies.backend == "engine"
    for conversation in (CHAT, "the quick brown fox"):
        by_engine = streamed(replies.reply, conversation, GREEDY)
        by_generate = streamed(generate, model, tokenizer, conversation, GREEDY)
        assert by_engine.token_ids == by_generate.token_ids and by_engine.text == by_generate.text
        assert by_engine.finish_reason == by_generate.finish_reason
    # run's chat engine decodes through the whole-tensor decode step on the CPU too, where the family has its form
    # (a mixture-of-experts MLP keeps the module path)
    runner = replies.engine.runner
    assert (runner.fast_decode_steps > 0) == (family != "mixtral"), runner.decode_step_reason


def test_stop_strings_cut_both_paths_alike(model, tokenizer):
    full = reply(model, tokenizer, CHAT, GREEDY)
    stop = full.text[len(full.text) // 2 :][:3]
    settings = GenerationSettings(max_new_tokens=12, temperature=0, stop=(stop,))
    by_engine = streamed(ReplyGenerator(model, tokenizer).reply, CHAT, settings)
    by_generate = streamed(generate, model, tokenizer, CHAT, settings)
    assert by_engine.text == by_generate.text == full.text[: full.text.index(stop)]
    assert by_engine.token_ids == by_generate.token_ids and by_engine.finish_reason == by_generate.finish_reason == "stop"


def test_a_model_the_engine_cannot_take_goes_through_generate(build_family, tokenizer, caplog):
    model = build_family("phi", seed=1, vocab_size=len(tokenizer), max_position_embeddings=128)
    with caplog.at_level(logging.WARNING, logger="qtool.runtime.reply"):
        replies = ReplyGenerator(model, tokenizer)
        first = streamed(replies.reply, CHAT, GREEDY)
        replies.reply(CHAT, GREEDY)
    assert [r.getMessage() for r in caplog.records] == [f"generating with transformers' generate: {replies.fallback_reason}"]
    assert "phi" in replies.fallback_reason and replies.backend == "transformers" and replies.stats() is None
    assert first.token_ids == generate(model, tokenizer, CHAT, GREEDY).token_ids


def test_time_to_first_token_on_both_paths(model, tokenizer):
    for result in (reply(model, tokenizer, CHAT, GREEDY), generate(model, tokenizer, CHAT, GREEDY)):
        assert 0 < result.time_to_first_token <= result.seconds
        assert result.to_dict()["time_to_first_token"] == result.time_to_first_token


def test_a_seed_repeats_the_reply_and_leaves_the_global_random_state_alone(model, tokenizer):
    replies = ReplyGenerator(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=5)
    state = torch.get_rng_state()
    first = replies.reply("the quick", settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert replies.reply("the quick", settings).token_ids == first.token_ids
    others = {tuple(replies.reply("the quick", GenerationSettings(max_new_tokens=12, temperature=1.0, seed=s)).token_ids)
              for s in range(3)}
    assert len(others | {tuple(first.token_ids)}) > 1


def test_the_context_limit_is_generates(make_tiny_llama, tokenizer):
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=16)
    with pytest.raises(QtoolError, match="the model's context is 16"):
        reply(model, tokenizer, "the quick brown fox jumps over the lazy dog " * 4, GREEDY)
    near = "the quick brown"  # a few tokens short of 16: the reply is cut at the context
    assert len(tokenizer(near)["input_ids"]) < 12
    by_engine = reply(model, tokenizer, near, GenerationSettings(max_new_tokens=50, temperature=0))
    assert by_engine.token_ids == generate(model, tokenizer, near, GenerationSettings(max_new_tokens=50, temperature=0)).token_ids


def test_a_chats_second_turn_reuses_the_first_from_the_prefix_cache(model, tokenizer):
    replies = ReplyGenerator(model, tokenizer, EngineConfig(block_size=4, max_num_seqs=1))
    first = replies.reply(CHAT, GREEDY)
    assert replies.stats().saved_prompt_tokens == 0
    second_turn = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "the old city"}]
    second = replies.reply(second_turn, GREEDY)
    stats = replies.stats()
    assert stats.prefix_hit_requests == 1 and stats.saved_prompt_tokens >= 20  # the system and first user turns
    assert second.token_ids == generate(model, tokenizer, second_turn, GREEDY).token_ids


def test_an_interrupted_reply_does_not_run_on_into_the_next(model, tokenizer):
    replies = ReplyGenerator(model, tokenizer)

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replies.reply(CHAT, GREEDY, on_text=interrupt)
    assert not replies.engine.has_unfinished()
    assert replies.reply(CHAT, GREEDY).token_ids == generate(model, tokenizer, CHAT, GREEDY).token_ids


def test_bad_settings_are_refused(model, tokenizer):
    for settings, match in [(GenerationSettings(min_p=1.0), "--min-p 1.0"),
                            (GenerationSettings(repetition_penalty=0), "--repetition-penalty 0"),
                            (GenerationSettings(stop=("",)), "--stop")]:
        with pytest.raises(QtoolError, match=match):
            reply(model, tokenizer, "hi", settings)
