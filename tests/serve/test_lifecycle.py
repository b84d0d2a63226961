"""What happens around a request: a client that disconnects (streaming or not) is aborted at once, its sequence
and blocks freed before the reply could have finished; a model whose step fails answers 500 in OpenAI's shape while
another model's request runs on untouched; Ctrl-C drains the requests in flight, then the engines' threads stop."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import torch

from qtool.serve.settings import ServeSettings

CHAT = "/v1/chat/completions"
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 200,
        "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(one_thread, make_served, start_server):
    return start_server([make_served("tiny")])


def open_request(port: int, body: dict) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", CHAT, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return connection


def wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def idle(model) -> bool:
    """The engine holds no request and no block (its worker's snapshot after its last step)."""
    snap = model.worker.snapshot
    return snap.running == 0 and snap.waiting == 0 and snap.stats["blocks_used"] == 0


def wait_aborted(server, model, aborted_before: int) -> None:
    metrics = server.app.state.metrics
    wait_until(lambda: metrics.aborted[model.name] == aborted_before + 1 and idle(model),
               f"the request was not aborted: {metrics.aborted}, {model.worker.snapshot}")




def test_streaming_client_that_leaves_is_aborted(server):
    model = server.app.state.served["tiny"]
    metrics = server.app.state.metrics
    aborted = metrics.aborted["tiny"]
    generated = model.worker.snapshot.stats["generated_tokens"]
    connection = open_request(server.server.port, {**LONG, "stream": True})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the role chunk: the request is in the batch
    connection.sock.shutdown(2)
    connection.close()
    wait_aborted(server, model, aborted)
    # freed before it could finish: it never generated its 200 tokens
    assert model.worker.snapshot.stats["generated_tokens"] - generated < LONG["max_tokens"]


def test_waiting_client_that_leaves_is_aborted(server):
    model = server.app.state.served["tiny"]
    metrics = server.app.state.metrics
    aborted = metrics.aborted["tiny"]
    generated = model.worker.snapshot.stats["generated_tokens"]
    connection = open_request(server.server.port, LONG)  # not streamed: the client leaves before any byte comes
    wait_until(lambda: model.worker.snapshot.running == 1, "the request never started")
    connection.sock.shutdown(2)
    connection.close()
    wait_aborted(server, model, aborted)
    assert model.worker.snapshot.stats["generated_tokens"] - generated < LONG["max_tokens"]


def test_a_failing_model_does_not_disturb_another(one_thread, make_served, start_server):
    good, bad = make_served("tiny"), make_served("broken", seed=2)
    with torch.no_grad():
        bad.model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))  # every step of it raises
    server = start_server([good, bad])
    port = server.server.port
    slow = open_request(port, {**LONG, "max_tokens": 60})
    failing = open_request(port, {**LONG, "model": "broken"})
    response = failing.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 500 and error["code"] == "engine_error" and "NaN" in error["message"], error
    response = slow.getresponse()
    body = json.loads(response.read())
    assert response.status == 200 and body["usage"]["completion_tokens"] == 60
    wait_until(lambda: idle(bad), "the failed request kept its blocks")
    assert bad.worker.snapshot.steps_failed >= 1


def test_ctrl_c_drains_requests_in_flight(one_thread, make_served, start_server):
    model = make_served("tiny")
    server = start_server([model], ServeSettings(port=0, drain_timeout_s=60))
    port = server.server.port
    connection = open_request(port, {**LONG, "max_tokens": 80, "stream": True, "stream_options": {"include_usage": True}})
    response = connection.getresponse()
    first = response.readline()
    assert first.startswith(b"data: ")
    assert server.app.state.server.in_flight == 1  # the stream is still running when Ctrl-C comes
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    rest = response.read().decode()  # the stream still runs to its end
    stopper.join(60)
    events = [json.loads(line[6:]) for line in (first.decode() + rest).splitlines()
              if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 80
    assert not server.thread.is_alive()  # uvicorn returned after the drain
    assert not model.worker.alive  # the lifespan stopped the engine's thread
    with pytest.raises(OSError):
        open_request(port, LONG).getresponse()  # nothing listens any more


def test_output_rate_falls_back_to_zero_when_idle(one_thread, make_served, start_server):
    model = make_served("tiny")
    model.worker.rate_window_s = 0.4
    server = start_server([model])
    connection = open_request(server.server.port, {**LONG, "max_tokens": 30})
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 30
    assert model.worker.snapshot.output_tokens_per_s > 0
    wait_until(lambda: model.worker.snapshot.output_tokens_per_s == 0, "the idle rate stayed above 0", timeout=10)
    status = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=10)
    status.request("GET", "/metrics")
    assert json.loads(status.getresponse().read())["models"]["tiny"]["output_tokens_per_s"] == 0
