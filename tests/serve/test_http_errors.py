"""Raw HTTP against a server with an API key: every malformed or refused request gets its 4xx in OpenAI's error
shape ({"error": {"message", "type", "param", "code"}}), never a 500 or a traceback; auth, body limit, draining,
and an exception inside a route (500, same shape, logged)."""

from __future__ import annotations

import http.client
import json

import pytest

from qtool.serve.settings import ServeSettings

KEY = "sk-test-0123"
LIMIT = 4096
CHAT = "/v1/chat/completions"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 3,
        "temperature": 0}


@pytest.fixture(scope="module")
def server(one_thread, make_served, start_server):
    settings = ServeSettings(port=0, api_key=KEY, max_body_bytes=LIMIT, max_tokens_limit=64, max_n=2)
    running = start_server([make_served("tiny")], settings)

    @running.app.get("/v1/boom")
    async def boom():
        raise RuntimeError("a bug inside a route")

    return running


def call(server, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
         headers: dict | None = None) -> tuple[int, dict, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=60)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    return response.status, data, text


def post(server, body, **kwargs) -> tuple[int, dict, str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(server, "POST", kwargs.pop("path", CHAT), raw, **kwargs)


def assert_error(status: int, data: dict, text: str, expected: int, param: str | None = None) -> dict:
    assert status == expected, text
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in text
    if param is not None:
        assert error["param"] == param, error
    return error


def test_a_good_request_passes(server):
    status, data, text = post(server, GOOD)
    assert status == 200, text
    assert data["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b"[" * 1500 + b"]" * 1500])
def test_bad_json_or_not_an_object(server, body):
    error = assert_error(*post(server, body), 400)
    assert error["code"] == "invalid_json"


def test_missing_and_wrong_key(server):
    for key in (None, "sk-wrong", ""):
        error = assert_error(*post(server, GOOD, key=key), 401)
        assert error["type"] == "authentication_error"
    assert_error(*call(server, "GET", "/v1/models", key=None), 401)
    assert_error(*call(server, "GET", "/metrics", key="nope"), 401)
    status, data, _ = call(server, "GET", "/health", key=None)  # the health check needs no key
    assert status == 200 and data["status"] == "ok"
    status, _, text = call(server, "GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"}, key=None)
    assert status == 200, text


def test_unknown_model_is_404(server):
    error = assert_error(*post(server, {**GOOD, "model": "gpt-4"}), 404, "model")
    assert error["code"] == "model_not_found" and "tiny" in error["message"]


def test_oversize_body_is_413(server):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}
    assert_error(*post(server, big), 413)
    # no Content-Length (chunked): cut off at the limit while reading
    connection = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=60)
    raw = json.dumps(big).encode()
    connection.request("POST", CHAT, body=iter([raw[i:i + 1000] for i in range(0, len(raw), 1000)]),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                       encode_chunked=True)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert_error(response.status, json.loads(text), text, 413)


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 65), ("max_tokens", 2.5),
                                         ("max_completion_tokens", -5), ("temperature", -0.1), ("top_p", 0),
                                         ("top_p", 1.5), ("top_k", -2), ("min_p", 1), ("repetition_penalty", 0),
                                         ("seed", -1), ("seed", 2**64), ("n", 0), ("n", 3), ("n", -1), ("stop", ""), ("stop", [1]),
                                         ("stream", "yes"), ("temperature", "hot"), ("messages", []),
                                         ("messages", [{"role": "wizard", "content": "hi"}]),
                                         ("messages", [{"role": "user", "content": [{"type": "image_url"}]}]),
                                         ("model", 5)])
def test_invalid_values_are_400_naming_the_field(server, field, value):
    error = assert_error(*post(server, {**GOOD, field: value}), 400)
    assert error["param"] is not None and error["param"].startswith(field), error


def test_unknown_fields_are_named(server):
    error = assert_error(*post(server, {**GOOD, "temprature": 0.5, "bogus": 1}), 400, "bogus")
    assert "'bogus'" in error["message"] and "'temprature'" in error["message"]
    assert error["code"] == "unknown_field"


@pytest.mark.parametrize("field,value", [("frequency_penalty", 1.0), ("presence_penalty", -0.5),
                                         ("logit_bias", {"5": 10}), ("top_logprobs", 2),
                                         ("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"})])
def test_features_not_served_are_400(server, field, value):
    assert_error(*post(server, {**GOOD, field: value}), 400, field)


def test_completions_errors(server):
    good = {"model": "tiny", "prompt": "the quick", "max_tokens": 2}
    assert post(server, good, path="/v1/completions")[0] == 200
    assert_error(*post(server, {**good, "prompt": ""}, path="/v1/completions"), 400, "prompt")
    assert_error(*post(server, {**good, "prompt": ["a", "b"]}, path="/v1/completions"), 400, "prompt")
    assert_error(*post(server, {**good, "prompt": [5, 99999]}, path="/v1/completions"), 400, "prompt")
    assert_error(*post(server, {**good, "echo": True}, path="/v1/completions"), 400, "echo")
    assert_error(*post(server, {**good, "messages": []}, path="/v1/completions"), 400, "messages")


def test_prompt_beyond_the_context_is_400(server):
    long = " ".join(["fox"] * 400)  # the tiny model's context is 256 positions
    error = assert_error(*post(server, {**GOOD, "messages": [{"role": "user", "content": long}]}), 400, "messages")
    assert error["code"] == "context_length_exceeded"


def test_routes_that_do_not_exist(server):
    error = assert_error(*call(server, "GET", "/v1/nothing"), 404)
    assert "/v1/nothing" in error["message"]
    assert_error(*call(server, "GET", CHAT), 405)


def test_an_exception_in_a_route_is_a_500_in_openai_shape(server):
    error = assert_error(*call(server, "GET", "/v1/boom"), 500)
    assert "a bug inside a route" not in error["message"]  # the details go to the log, not the client
    assert post(server, GOOD)[0] == 200  # the server goes on


def test_metrics_json_and_prometheus(server):
    post(server, GOOD)
    status, data, text = call(server, "GET", "/metrics")
    assert status == 200, text
    model = data["models"]["tiny"]
    assert model["completion_tokens"] >= 1 and model["num_blocks"] == 256
    assert any(row["status"] == 400 for row in data["requests"])
    assert {"endpoint": CHAT, "status": 401} in [{k: r[k] for k in ("endpoint", "status")} for r in data["requests"]]
    assert not any(row["status"] >= 500 for row in data["requests"] if row["endpoint"] == CHAT)
    status, _, text = call(server, "GET", "/metrics?format=prometheus")
    assert status == 200 and 'qtool_completion_tokens_total{model="tiny"}' in text
    assert 'qtool_http_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_draining_refuses_new_requests_with_503(server):
    state = server.app.state.server
    state.draining = True
    try:
        error = assert_error(*post(server, GOOD), 503)
        assert error["code"] == "draining"
        status, data, _ = call(server, "GET", "/health", key=None)
        assert status == 200 and data["status"] == "draining"
    finally:
        state.draining = False
    assert post(server, GOOD)[0] == 200


def test_the_other_accepted_spellings(server):
    parts = {**GOOD, "messages": [{"role": "developer", "content": "be brief"},
                                  {"role": "user", "content": [{"type": "text", "text": "the quick "},
                                                               {"type": "text", "text": "brown fox"}], "name": "ann"}],
             "stop": "\n\n", "top_k": -1, "n": None, "user": "ann", "stream": False}
    status, data, text = post(server, parts)
    assert status == 200, text
    same = {**GOOD, "messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "the quick brown fox"}], "stop": ["\n\n"]}
    assert post(server, same)[1]["choices"] == data["choices"]
    status, data, text = post(server, {"model": "tiny", "prompt": [[5, 6, 7]], "max_tokens": 2}, path="/v1/completions")
    assert status == 200 and data["usage"]["prompt_tokens"] == 3, text


def test_every_path_needs_the_key_unless_made_public(server):
    # a 404 for a path nobody may see is still a 401 without the key: nothing is learnt about the routes
    assert_error(*call(server, "GET", "/anything", key=None), 401)
    state = server.app.state.server
    state.public_prefixes.append("/pub/")
    try:
        assert_error(*call(server, "GET", "/pub/page", key=None), 404)
    finally:
        state.public_prefixes.remove("/pub/")
    assert_error(*call(server, "GET", "/pub/page", key=None), 401)
