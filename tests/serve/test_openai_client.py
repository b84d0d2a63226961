"""The official openai client, unchanged, against `qtool serve`'s app on a loopback port: chat and completions,
streamed and whole, stop strings, max_tokens, seeded sampling, n > 1, routing by model (logprobs in
test_logprobs_serve.py). Greedy replies are checked against transformers' own generate on a separately built copy
of the same weights."""

from __future__ import annotations

import openai
import pytest

from qtool.runtime.generate import GenerationSettings, generate

USER = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def server(one_thread, make_served, start_server):
    return start_server([make_served("tiny"), make_served("tiny-b", seed=1)])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(make_served):
    """transformers' greedy reply of a fresh copy of model `tiny` (seed 0) or `tiny-b` (seed 1)."""
    copies = {"tiny": make_served("ref-a"), "tiny-b": make_served("ref-b", seed=1)}

    def greedy(name: str, conversation, max_tokens: int) -> str:
        copy = copies[name]
        settings = GenerationSettings(max_new_tokens=max_tokens, temperature=0)
        return generate(copy.model, copy.tokenizer, conversation, settings).text

    return greedy


def test_chat_greedy_equals_transformers_generate(client, reference):
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference("tiny", USER, 12)
    assert reply.model == "tiny" and reply.object == "chat.completion"
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_requests_route_by_model_field(client, reference):
    texts = {name: client.chat.completions.create(model=name, messages=USER, max_tokens=10, temperature=0)
             .choices[0].message.content for name in ("tiny", "tiny-b")}
    assert texts == {name: reference(name, USER, 10) for name in texts}
    assert texts["tiny"] != texts["tiny-b"]  # two different random models
    assert {m.id for m in client.models.list().data} == {"tiny", "tiny-b"}


def test_stream_pieces_concatenate_to_the_whole_reply(client, reference):
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == reference("tiny", USER, 12)
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens >= 1 and usage.prompt_tokens > 0


def test_stop_string_cuts_the_reply(client, reference):
    full = reference("tiny", USER, 16)
    stop = full[4:6]
    assert len(stop) == 2, full
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[: full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.find(stop)]


def test_max_tokens_is_the_number_of_new_tokens(client):
    for field in ("max_tokens", "max_completion_tokens"):
        reply = client.chat.completions.create(model="tiny", messages=USER, temperature=0.9, seed=3,
                                               extra_body={"ignore_eos": True}, **{field: 7})
        assert reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=1.0,
                                              seed=seed, extra_body={"ignore_eos": True}).choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    # a random model over 320 ids at temperature 1: other seeds draw other texts
    assert {sample(12), sample(13)} != {first}


def test_n_choices_are_seed_plus_index(client):
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=1.0, seed=21,
                                           n=3, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    for index, text in enumerate(texts):
        alone = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=1.0,
                                               seed=21 + index, extra_body={"ignore_eos": True})
        assert alone.choices[0].message.content == text
    assert len(set(texts)) > 1
    assert reply.usage.completion_tokens == 3 * 8
    streamed = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=1.0, seed=21,
                                              n=3, stream=True, extra_body={"ignore_eos": True})
    pieces = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == texts


def test_completions_text_and_token_ids(client, make_served, reference):
    prompt = "the quick brown fox"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0)
    assert reply.choices[0].text == reference("tiny", prompt, 9)
    ids = make_served("ids").tokenizer(prompt)["input_ids"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=9, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_unknown_model_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=USER, max_tokens=4)
    assert caught.value.code == "model_not_found" and "tiny" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert client.models.retrieve("tiny-b").id == "tiny-b"


def test_unsupported_fields_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, logit_bias={"5": 10})
    assert caught.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, frequency_penalty=0.5)
    assert caught.value.param == "frequency_penalty" and "repetition_penalty" in caught.value.message
    # neutral values and the ignored fields are taken
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, frequency_penalty=0,
                                           presence_penalty=0, user="someone", temperature=0)
    assert reply.usage.completion_tokens <= 3
