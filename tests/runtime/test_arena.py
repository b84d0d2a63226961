"""The arena: each model's reply to one prompt is the one it gives alone (greedy, against transformers' generate),
streamed under its own name, with its own timings."""

from __future__ import annotations

from collections import defaultdict

import pytest

from qtool.core.errors import QtoolError
from qtool.runtime.arena import Contender, run_arena
from qtool.runtime.generate import GenerationSettings
from qtool.runtime.reply import ReplyGenerator

from cli_checks import greedy_reply


def test_each_reply_is_the_models_own(make_tiny_llama, tokenizer, one_torch_thread):
    models = {"a": make_tiny_llama(seed=3, vocab_size=len(tokenizer)), "b": make_tiny_llama(seed=4, vocab_size=len(tokenizer))}
    conversation = [{"role": "user", "content": "the quick fox"}]
    streamed = defaultdict(str)
    replies = run_arena([Contender(name, ReplyGenerator(m, tokenizer), conversation) for name, m in models.items()],
                        GenerationSettings(max_new_tokens=6, temperature=0),
                        on_text=lambda name, piece: streamed.__setitem__(name, streamed[name] + piece))
    assert [r.name for r in replies] == ["a", "b"]
    for reply in replies:
        assert reply.text == greedy_reply(models[reply.name], tokenizer, conversation) == streamed[reply.name]
        assert reply.tokens == 6 and reply.backend == "engine"
        assert 0 < reply.time_to_first_token <= reply.seconds
        assert reply.tokens_per_second == pytest.approx(reply.tokens / reply.seconds)
    assert replies[0].text != replies[1].text  # two random models: the table compares different replies


def test_the_arena_needs_two_distinct_models(make_tiny_llama, tokenizer):
    replies = ReplyGenerator(make_tiny_llama(vocab_size=len(tokenizer)), tokenizer)
    with pytest.raises(QtoolError, match="at least two models"):
        run_arena([Contender("a", replies, "x")], GenerationSettings())
    with pytest.raises(QtoolError, match="must differ"):
        run_arena([Contender("a", replies, "x"), Contender("a", replies, "x")], GenerationSettings())
