"""The host-side streaming path of `qtool serve`: the pacer that holds a stream's text for a few engine steps while
the event loop's CPU share is over its budget (and never holds a first text, an end or longer than max_hold_s),
a completion's reader woken once per due step, the SSE text chunks encoded from a template (equal to the dict
chunks, a chunk per engine piece with its logprobs in order, several steps' in one write), and over HTTP a
server forced to pace every stream: the same chunks as one that sends every step."""

from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import httpx2
import pytest

from qtool.runtime.token_logprobs import TokenLogprob, TokenTexts
from qtool.serve.completions import Reply
from qtool.serve.logprobs_format import chat_logprobs, completion_logprobs
from qtool.serve.model_pool import Completion, deliver
from qtool.serve.protocol import CompletionRequest
from qtool.serve.settings import ServeSettings
from qtool.serve.stream_pacing import StreamPacer


def drive(pacer: StreamPacer, share_at, steps: int, step_s: float, rng: random.Random,
          holds: list | None = None) -> list[int]:
    """Tick the pacer `steps` times, steps about step_s apart, the loop's CPU per step share_at(every) of it;
    `every` after each tick (and in `holds` the time it holds text: every x the step time it saw)."""
    now, cpu, seen = 100.0, 5.0, []
    for _ in range(steps):
        wall = step_s * rng.uniform(0.9, 1.1)
        now += wall
        cpu += wall * share_at(pacer.every)
        pacer.tick(now, cpu)
        seen.append(pacer.every)
        if holds is not None:
            holds.append(pacer.every * pacer.step_s)
    return seen


def test_pacer_settles_under_its_budget_and_back_to_every_step():
    rng = random.Random()
    budget = rng.uniform(0.03, 0.1)
    cost = budget * rng.uniform(3, 6)  # the loop's share when every stream sends every step
    pacer = StreamPacer(cpu_budget=budget, max_hold_s=100.0)
    seen = drive(pacer, lambda every: cost / every, 200, 0.05, rng)
    assert seen[0] == 1 and max(seen) > 1
    settled = seen[-50:]
    # within the hysteresis band: the share under the budget, above half of it
    assert all(cost / every <= budget * 1.15 and cost / every >= budget / 2 * 0.85 for every in settled), settled
    # the load goes away (few streams): back to every step's text
    seen = drive(pacer, lambda every: budget / 10, 60, 0.05, rng)
    assert seen[-1] == 1


def test_pacer_never_holds_longer_than_max_hold():
    rng = random.Random()
    step_s = rng.uniform(0.02, 0.08)
    pacer = StreamPacer(cpu_budget=0.01, max_hold_s=0.25)
    holds: list[float] = []
    seen = drive(pacer, lambda every: 0.5, 100, step_s, rng, holds)
    assert max(seen) >= 2 and max(holds) <= 0.25 + 1e-9, (seen, holds)
    slow = StreamPacer(cpu_budget=0.01, max_hold_s=0.25)
    assert set(drive(slow, lambda every: 0.5, 30, 0.3, rng)) == {1}  # steps longer than the hold: never held


def test_completion_wakes_for_first_text_due_steps_and_the_end():
    async def scenario():
        loop = asyncio.get_running_loop()
        pacer = StreamPacer(cpu_budget=0.1, max_hold_s=100.0)
        pacer.every = 3  # and the loop's share stays inside the band that keeps it (0.05..0.1)
        held_still = Completion(loop, pacer=pacer)
        completion = Completion(loop, pacer=pacer)
        woken: list[tuple[int, list]] = []

        async def reader(c, log):
            while True:
                await c.wait()
                events = c.take()
                log.append((pacer.steps, events))
                if any(kind == "done" for _, kind, _ in events):
                    return

        task = asyncio.ensure_future(reader(completion, woken))
        other: list = []
        other_task = asyncio.ensure_future(reader(held_still, other))
        await asyncio.sleep(0)
        clocks = [0.0, 0.0]

        async def step(batches):
            clocks[0] += 0.05
            clocks[1] += 0.05 * 0.075
            deliver(batches, *clocks)
            await asyncio.sleep(0)

        await step({completion: [(0, "accepted", 0)], held_still: [(0, "accepted", 1)]})
        await step({completion: [(0, "text", "a")], held_still: [(0, "text", "x")]})  # first text: at once
        await step({completion: [(0, "text", "b")], held_still: [(0, "text", "y")]})
        await step({completion: [(0, "text", "c")]})  # held_still has nothing new: its "y" waits
        await step({completion: [(0, "text", "d")]})  # 3 steps after the first text: due (and held_still's too)
        await step({completion: [(0, "text", "e")]})
        await step({completion: [(0, "done", None)], held_still: [(0, "done", None)]})  # the end: at once
        await asyncio.wait_for(asyncio.gather(task, other_task), 5)
        return woken, other

    woken, other = asyncio.run(scenario())
    assert [(step, "".join(p for _, kind, p in events if kind == "text")) for step, events in woken] == \
        [(1, ""), (2, "a"), (5, "bcd"), (7, "e")]
    assert [(step, "".join(p for _, kind, p in events if kind == "text")) for step, events in other] == \
        [(1, ""), (2, "x"), (5, "y"), (7, "")]


def test_completion_without_pacer_wakes_every_push_and_on_leave():
    async def scenario():
        completion = Completion(asyncio.get_running_loop())
        waiter = asyncio.ensure_future(completion.wait())
        await asyncio.sleep(0)
        deliver({completion: [(0, "text", "a")]}, 1.0, 0.0)
        await asyncio.wait_for(waiter, 5)
        assert completion.take() == [(0, "text", "a")]
        waiter = asyncio.ensure_future(completion.wait())
        await asyncio.sleep(0)
        completion.leave()
        await asyncio.wait_for(waiter, 5)
        return completion.gone

    assert asyncio.run(scenario()) is True


def random_text(rng: random.Random) -> str:
    alphabet = 'ab "\\\n\t/é€😀<>&\u2028'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))


def parse_sse(data: bytes) -> list[dict]:
    text = data.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events]


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("with_logprobs", [False, True])
def test_stream_chunks_equal_the_dict_chunks_and_add_up(kind, with_logprobs, make_tiny_tokenizer):
    rng = random.Random()
    texts = TokenTexts(make_tiny_tokenizer())
    n = rng.randint(1, 3)
    request = CompletionRequest(kind, "tiny-\"model\"", n=n, stream=True, include_usage=rng.random() < 0.5,
                                logprobs=rng.randint(0, 3) if with_logprobs else None)
    reply = Reply(request, request.model, 5, texts)
    sent_pieces, all_entries = [[] for _ in range(n)], [[] for _ in range(n)]
    finished = [False] * n
    chunks = []
    while not all(finished):
        events = []
        for _ in range(rng.randint(1, 8)):  # one wake's events: several steps' pieces when the reader lagged
            running = [i for i in range(n) if not finished[i]]
            if not running:
                break
            index = rng.choice(running)
            if with_logprobs:
                entries = [TokenLogprob(rng.randrange(300), -rng.random() * 5,
                                        tuple((rng.randrange(300), -rng.random() * 5) for _ in range(request.logprobs)))
                           for _ in range(rng.randint(0, 2))]
                all_entries[index] += entries
                events.append((index, "logprobs", entries))
            if rng.random() < 0.15:
                finished[index] = True
                events.append((index, "done", SimpleNamespace(finish_reason="length")))
            else:
                events.append((index, "text", random_text(rng)))
                sent_pieces[index].append(events[-1][2])
        chunks += parse_sse(reply.stream(events))
    got_pieces, got_logprobs = [[] for _ in range(n)], [[] for _ in range(n)]
    for chunk in chunks:
        (choice,) = chunk["choices"]
        index = choice["index"]
        if choice["finish_reason"] is None:
            text = choice["delta"]["content"] if kind == "chat" else choice["text"]
            expected = reply.chunk(index, text=text, logprobs=choice["logprobs"])
            assert chunk == json.loads(json.dumps(expected))  # the template's chunk is the dict chunk
            got_pieces[index].append(text)
        if choice["logprobs"] is not None:
            got_logprobs[index].append(choice["logprobs"])
    assert got_pieces == sent_pieces
    for index in range(n):
        if not with_logprobs:
            assert got_logprobs[index] == []
            continue
        # the chunks' logprobs, in order, are the choice's whole list (completions: offsets continue)
        if kind == "chat":
            whole = chat_logprobs(all_entries[index], texts)["content"]
            assert [e for part in got_logprobs[index] for e in part["content"]] == json.loads(json.dumps(whole))
        else:
            whole = json.loads(json.dumps(completion_logprobs(all_entries[index], texts)))
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                assert [v for part in got_logprobs[index] for v in part[key]] == whole[key]


def test_paced_stream_over_http_sends_the_same_chunks(one_thread, make_served, start_server):
    """Every stream held (budget tiny, a long hold): each stream's chunks equal those of a server that sends every
    step's text, piece for piece."""
    rng = random.Random()
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(3, 12))] for _ in range(4)]
    tokens = 16

    async def stream_all(url: str) -> list[list[str]]:
        async def one(client, prompt):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            pieces = []
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
            return pieces

        async with httpx2.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[one(client, p) for p in prompts])

    every_step = start_server([make_served("tiny")], ServeSettings(port=0, stream_cpu_budget=1.0))
    paced = start_server([make_served("tiny")], ServeSettings(port=0, stream_cpu_budget=1e-6))
    paced.app.state.pacers["tiny"].max_hold_s = 60.0  # the tiny model's CPU steps are slow: allow long holds
    plain = asyncio.run(stream_all(every_step.url))
    held = asyncio.run(stream_all(paced.url))
    assert held == plain
    assert all("".join(pieces) for pieces in held)
    every = paced.app.state.pacers["tiny"].every
    assert every > 1
    metrics = httpx2.get(paced.url + "/metrics", timeout=30).json()["models"]["tiny"]
    assert metrics["stream_every_steps"] == every and metrics["loop_cpu_share"] > 0
