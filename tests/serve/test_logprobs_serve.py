"""Logprobs through `qtool serve` with the official openai client: chat (logprobs + top_logprobs) and completions
(logprobs: k) in OpenAI's shapes, whole and streamed (the streamed pieces add up to the whole, and a chunk's text
never runs ahead of its tokens), the values equal to transformers' forward logits over the same tokens on a
separately built copy of the weights, n > 1, and bad values refused as 400s naming the field."""

from __future__ import annotations

import openai
import pytest
import torch

from qtool.runtime.generate import prompt_ids
from qtool.runtime.token_logprobs import CHAR_TO_BYTE

USER = [{"role": "user", "content": "what is the capital of france"}]
PROMPT = "the quick brown fox"
ATOL = 2e-5  # the engine's attention and the model's own differ by float32 rounding
BYTE_TO_CHAR = {byte: char for char, byte in CHAR_TO_BYTE.items()}
VOCAB = 300  # the tiny tokenizer's: every id the model draws has its text and bytes


@pytest.fixture(scope="module")
def server(one_thread, make_served, start_server):
    return start_server([make_served("tiny", vocab_size=VOCAB)])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def copy(make_served):
    """A fresh build of model `tiny`'s weights (seed 0) and its tokenizer, outside the server."""
    return make_served("reference", vocab_size=VOCAB)


def reference_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """float64 log_softmax of transformers' forward logits at the positions that chose each output token."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].double()
    return logits[len(prompt) - 1 : -1].log_softmax(dim=-1)


def token_id(tokenizer, token_bytes: list[int]) -> int:
    """The id a byte-level BPE token with these bytes has (specials spell themselves in printable ASCII)."""
    return tokenizer.convert_tokens_to_ids("".join(BYTE_TO_CHAR[b] for b in token_bytes))


def visible_bytes(tokenizer, entries) -> bytes:
    """The entries' bytes without special tokens' (the reply's text skips them)."""
    specials = {s.encode() for s in tokenizer.all_special_tokens}
    return b"".join(bytes(entry.bytes) for entry in entries if bytes(entry.bytes) not in specials)


def test_chat_logprobs_equal_the_models_whole_and_streamed(client, copy):
    request = dict(model="tiny", messages=USER, max_tokens=12, temperature=0.9, seed=7, logprobs=True,
                   top_logprobs=5, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    ids = [token_id(copy.tokenizer, entry.bytes) for entry in content]
    assert visible_bytes(copy.tokenizer, content).decode("utf-8", errors="replace") == choice.message.content
    reference = reference_logprobs(copy.model, prompt_ids(copy.tokenizer, USER)[0].tolist(), ids)
    for row, token, entry in zip(reference, ids, content):
        assert entry.token == copy.tokenizer.decode([token])
        assert entry.logprob == pytest.approx(row[token].item(), abs=ATOL)
        assert len(entry.top_logprobs) == 5
        values = torch.tensor([top.logprob for top in entry.top_logprobs], dtype=torch.float64)
        torch.testing.assert_close(values, row.topk(5).values, rtol=0, atol=ATOL)
        top_ids = [token_id(copy.tokenizer, top.bytes) for top in entry.top_logprobs]
        torch.testing.assert_close(values, row[top_ids], rtol=0, atol=ATOL)

    streamed, text = [], ""
    for chunk in client.chat.completions.create(**request, stream=True):
        if not chunk.choices:
            continue
        piece = chunk.choices[0]
        entries = piece.logprobs.content if piece.logprobs is not None else []
        streamed += entries
        text += piece.delta.content or ""
        # the text so far comes from tokens already listed
        assert visible_bytes(copy.tokenizer, streamed).decode("utf-8", errors="replace").startswith(text)
    assert text == choice.message.content
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in content]


def test_chat_logprobs_only_when_asked(client):
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    bare = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0, logprobs=True)
    assert bare.choices[0].message.content == plain.choices[0].message.content
    content = bare.choices[0].logprobs.content
    assert len(content) == bare.usage.completion_tokens and all(entry.top_logprobs == [] for entry in content)
    # greedy: each token is the most likely one, and logprobs are the model's own, not a temperature-0 spike
    assert all(entry.logprob < 0 for entry in content)


def test_completions_logprobs_whole_and_streamed(client, copy):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=9, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens == 9
    prompt = copy.tokenizer(PROMPT)["input_ids"]
    # greedy: rebuild the ids from the model's own argmax, each checked against the token text served
    ids = []
    for _ in range(9):
        ids.append(int(reference_logprobs(copy.model, prompt, ids + [0])[-1].argmax()))
    assert logprobs.tokens == [copy.tokenizer.decode([i]) for i in ids]
    reference = reference_logprobs(copy.model, prompt, ids)
    texts = [copy.tokenizer.decode([i]) for i in range(reference.shape[1])]
    offset = 0
    for row, token, text, value, top, start in zip(reference, ids, logprobs.tokens, logprobs.token_logprobs,
                                                   logprobs.top_logprobs, logprobs.text_offset):
        assert value == pytest.approx(row[token].item(), abs=ATOL)
        assert start == offset
        offset += len(text)
        # the 3 most likely and the chosen one (greedy: among them), keyed by text, the likelier of a shared text
        expected: dict[str, float] = {}
        for i in row.topk(3).indices.tolist() + [token]:
            expected.setdefault(texts[i], row[i].item())
        assert set(top) == set(expected) and text in top
        assert [top[key] for key in expected] == pytest.approx(list(expected.values()), abs=ATOL)

    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=9, temperature=0, logprobs=3,
                                           stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            for key in streamed:
                streamed[key] += getattr(chunk.choices[0].logprobs, key)
    assert streamed == {key: getattr(logprobs, key) for key in streamed}


def test_n_choices_each_have_their_logprobs(client):
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=1.0, seed=3, n=2,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [len(c.logprobs.content) for c in reply.choices] == [6, 6] == [reply.usage.completion_tokens // 2] * 2
    assert reply.choices[0].logprobs.content != reply.choices[1].logprobs.content
    alone = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=1.0, seed=4,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    # the same draws as choice 1 (seed + 1); batched and alone differ only by float32 rounding
    mine, theirs = alone.choices[0].logprobs.content, reply.choices[1].logprobs.content
    assert [entry.bytes for entry in mine] == [entry.bytes for entry in theirs]
    assert [entry.logprob for entry in mine] == pytest.approx([entry.logprob for entry in theirs], abs=ATOL)


@pytest.mark.parametrize("fields,param", [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                          ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                                          ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
                                          ({"top_logprobs": 3}, "top_logprobs"),
                                          ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
                                          ({"logprobs": "yes"}, "logprobs")])
def test_bad_chat_logprobs_are_400_naming_the_field(client, fields, param):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, stream=stream, **fields)
        assert caught.value.param == param and caught.value.status_code == 400
        assert caught.value.body["type"] == "invalid_request_error" and param in caught.value.message


@pytest.mark.parametrize("value", [21, -1, True, 1.5])
def test_bad_completion_logprobs_are_400_naming_the_field(client, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, logprobs=value)
    assert caught.value.param == "logprobs" and "0..20" in caught.value.message


@pytest.mark.slow
def test_smollm2_logprobs_equal_its_forward_logits(one_thread, smollm2_path, start_server):
    from qtool.runtime.engine import EngineConfig
    from qtool.runtime.engine_sizing import EngineSizing
    from qtool.serve.model_pool import load_served_models
    from qtool.serve.settings import ServeSettings

    (served,) = load_served_models(["smollm2-135m"], ["smol"], EngineConfig(), EngineSizing(8, 256), device="cpu",
                                   dtype="float32")
    server = start_server([served], ServeSettings(port=0))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smol", messages=question, max_tokens=16, temperature=0.7, seed=1,
                                           logprobs=True, top_logprobs=4)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    ids = [token_id(served.tokenizer, entry.bytes) for entry in content]
    reference = reference_logprobs(served.model, prompt_ids(served.tokenizer, question)[0].tolist(), ids)
    for row, token, entry in zip(reference, ids, content):
        assert entry.token == served.tokenizer.decode([token])
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)


def test_raw_bodies_validate_against_the_clients_own_types(client):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=3, temperature=0,
                                                           logprobs=True, top_logprobs=2).http_response.json()
    reply = ChatCompletion.model_validate(raw)  # validated, not constructed: a wrong type fails here
    assert set(raw["choices"][0]["logprobs"]) == {"content", "refusal"}
    assert set(raw["choices"][0]["logprobs"]["content"][0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2
    raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                                      logprobs=2).http_response.json()
    Completion.model_validate(raw)
    assert set(raw["choices"][0]["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    with client.chat.completions.with_streaming_response.create(model="tiny", messages=USER, max_tokens=3,
                                                                temperature=0, logprobs=True, stream=True) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: {")]
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events]
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) >= 1
