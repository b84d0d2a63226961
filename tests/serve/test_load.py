"""A bounded load test on loopback: 64 concurrent clients at once against one tiny model whose engine runs at most
16 sequences (so requests queue): greedy streaming requests, clients that disconnect midway, and garbage. Every
well-formed request completes with the text it gets alone, every garbage request gets a 4xx in OpenAI's shape, the
disconnected ones are aborted, nothing answers 5xx, and afterwards the engine is idle again (no running or waiting
sequence, no used block, no request left in its worker)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx2
import pytest

from qtool.runtime.engine import EngineConfig
from qtool.serve.settings import ServeSettings

CHAT = "/v1/chat/completions"
GOOD_CLIENTS, LEAVING_CLIENTS, GARBAGE_CLIENTS = 40, 12, 12
ENGINE = EngineConfig(num_blocks=160, max_num_seqs=16, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def server(one_thread, make_served, start_server):
    return start_server([make_served("tiny", engine=ENGINE)], ServeSettings(port=0, max_body_bytes=16384))


def good_requests(words: tuple[str, ...], count: int) -> list[dict]:
    rng = random.Random(7)
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(10)]
    return [{"model": "tiny", "messages": [{"role": "user", "content": prompts[i % 10]}], "temperature": 0,
             "max_tokens": 4 + (i % 10), "stream": True} for i in range(count)]


def garbage_bodies() -> list[bytes]:
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    bodies = [b"{", b"\x00\x01\x02garbage", b"[]", json.dumps({**good, "max_tokens": -3}).encode(),
              json.dumps({**good, "model": "other"}).encode(), json.dumps({**good, "wat": True}).encode(),
              json.dumps({**good, "messages": "hi"}).encode(), json.dumps({**good, "n": 1000}).encode(),
              json.dumps({**good, "temperature": "x"}).encode(), json.dumps({**good, "stop": [None]}).encode(),
              json.dumps({**good, "messages": [{"role": "user", "content": "x" * 20000}]}).encode(),
              json.dumps(good).encode()[:-5]]
    assert len(bodies) == GARBAGE_CLIENTS
    return bodies


async def stream_text(client: httpx2.AsyncClient, body: dict, leave_after: int | None = None) -> dict:
    """The streamed reply's text, finish reason and status; with leave_after, disconnect after that many events."""
    text, finish, events = "", None, 0
    async with client.stream("POST", CHAT, content=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"}) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "body": json.loads(await response.aread())}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if leave_after is not None and events >= leave_after:
                return {"status": 200, "left": True}  # closing the stream here drops the connection
            if line == "data: [DONE]":
                return {"status": 200, "text": text, "finish": finish, "done": True}
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            text += choice["delta"].get("content", "")
            finish = choice["finish_reason"] or finish
    return {"status": 200, "text": text, "finish": finish, "done": False}


async def send_garbage(client: httpx2.AsyncClient, body: bytes) -> dict:
    response = await client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    return {"status": response.status_code, "body": response.json()}


async def crowd(url: str, good: list[dict], leaving: list[dict], garbage: list[bytes]) -> list[dict]:
    limits = httpx2.Limits(max_connections=128, max_keepalive_connections=0)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        tasks = [stream_text(client, body) for body in good]
        tasks += [stream_text(client, body, leave_after=1 + i % 3) for i, body in enumerate(leaving)]
        tasks += [send_garbage(client, body) for body in garbage]
        order = list(range(len(tasks)))
        random.Random(3).shuffle(order)  # garbage and leavers arrive among the good ones
        results = await asyncio.gather(*[tasks[i] for i in order])
    return [results[order.index(i)] for i in range(len(tasks))]


def test_64_concurrent_clients(server, tiny_words):
    good = good_requests(tiny_words, GOOD_CLIENTS)
    alone = {}
    for body in good[:10]:  # the 10 distinct requests, one at a time
        result = asyncio.run(crowd(server.url, [body], [], []))[0]
        assert result["done"], result
        alone[json.dumps(body)] = result["text"]
    assert len(set(alone.values())) > 1
    leaving = [{"model": "tiny", "messages": [{"role": "user", "content": "the lazy dog"}], "max_tokens": 150,
                "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True} for i in range(LEAVING_CLIENTS)]
    model = server.app.state.served["tiny"]
    metrics = server.app.state.metrics
    began = time.monotonic()
    results = asyncio.run(crowd(server.url, good, leaving, garbage_bodies()))
    assert len(results) == GOOD_CLIENTS + LEAVING_CLIENTS + GARBAGE_CLIENTS
    for body, result in zip(good, results[:GOOD_CLIENTS]):
        assert result["status"] == 200 and result["done"], result
        assert result["text"] == alone[json.dumps(body)]
        assert result["finish"] in ("stop", "length")
    assert all(r.get("left") for r in results[GOOD_CLIENTS:GOOD_CLIENTS + LEAVING_CLIENTS])
    for result in results[GOOD_CLIENTS + LEAVING_CLIENTS:]:
        assert 400 <= result["status"] < 500, result
        assert set(result["body"]["error"]) == {"message", "type", "param", "code"}
    # the leavers' requests are aborted and every block comes back
    deadline = time.monotonic() + 30
    while not (metrics.aborted["tiny"] == LEAVING_CLIENTS and model.worker.pending == 0
               and model.worker.snapshot.running == model.worker.snapshot.waiting == 0
               and model.worker.snapshot.stats["blocks_used"] == 0 and server.app.state.server.in_flight == 0):
        assert time.monotonic() < deadline, (metrics.aborted, model.worker.snapshot, server.app.state.server)
        time.sleep(0.02)
    assert not any(status >= 500 for (_, status) in metrics.requests)
    # the crowd really ran together: a full batch at once, others queued for a slot
    assert model.worker.snapshot.peak_running == ENGINE.max_num_seqs
    assert model.worker.snapshot.peak_waiting > 0
    assert time.monotonic() - began < 60
