"""The two completion endpoints' flow: the body read and checked (protocol.py), the prompt tokenized (chat through
the model's template) and each choice's SamplingParams built over the model's defaults, the choices handed to the
model's worker, then the reply whole or as server-sent events. A client that disconnects is aborted at once (its
sequences and blocks freed before the engine's next step); refusals are 400s, a failed engine step a 500."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from qtool.core.errors import QtoolError
from qtool.runtime.engine import RequestOutput, SamplingParams
from qtool.runtime.generate import has_chat_template, prompt_ids
from qtool.runtime.token_logprobs import TokenTexts
from qtool.serve.api_errors import ApiError
from qtool.serve.event_stream import EventStream, sse
from qtool.serve.logprobs_format import chat_logprobs, completion_logprobs, text_length
from qtool.serve.metrics import ServerMetrics
from qtool.serve.model_pool import Completion, ServedModel
from qtool.serve.protocol import CompletionRequest, parse_chat_request, parse_completion_request
from qtool.serve.settings import ServeSettings

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""


def find_model(served: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in served:
        raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(served)}", param="model",
                       code="model_not_found")
    return served[name]


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read up to `limit` bytes (a chunked body without Content-Length is cut off there too)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
        raise ApiError(400, f"the request body is not valid JSON: {exc}"[:300], code="invalid_json") from None


def prepare(served: ServedModel, request: CompletionRequest, settings: ServeSettings) -> tuple[list[int], list[SamplingParams]]:
    """The prompt's token ids and each choice's sampling settings (the model's defaults under the request's own
    fields); a 400 for what the model cannot take."""
    tokenizer = served.tokenizer
    if request.kind == "chat":
        if not has_chat_template(tokenizer):
            raise ApiError(400, f"model {served.name!r} has no chat template: send the text to {COMPLETIONS}",
                           param="messages", code="no_chat_template")
        try:
            ids = prompt_ids(tokenizer, request.messages)[0].tolist()
        except Exception as exc:  # a template's own refusal (jinja raise_exception: roles must alternate, ...)
            raise ApiError(400, f"the chat template of {served.name!r} refused the messages: {exc}",
                           param="messages", code="chat_template_error") from None
    elif isinstance(request.prompt, str):
        ids = list(tokenizer(request.prompt)["input_ids"])
    else:
        ids = request.prompt
        vocab = served.model.config.vocab_size
        if max(ids) >= vocab:
            raise ApiError(400, f"prompt token id {max(ids)} is outside the vocabulary of {vocab}", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
    limit = min(x for x in (served.context_length, served.engine.capacity_tokens) if x)
    room = limit - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and model {served.name!r} holds {limit} tokens per "
                       "request (context or KV cache)", param="messages" if request.kind == "chat" else "prompt",
                       code="context_length_exceeded")
    if request.max_tokens is not None and request.max_tokens > room:
        raise ApiError(400, f"max_tokens={request.max_tokens} does not fit: the prompt is {len(ids)} tokens of the "
                       f"{limit} model {served.name!r} holds per request, so at most {room}", param="max_tokens",
                       code="context_length_exceeded")
    max_tokens = request.max_tokens or min(settings.max_tokens_limit, room)
    sampling = {**served.defaults.values, **request.sampling}
    params = []
    for index in range(request.n):
        seed = sampling.get("seed")
        fields = {**sampling, "seed": None if seed is None else seed + index}  # n choices: n different draws
        try:
            params.append(SamplingParams(max_tokens=max_tokens, logprobs=request.logprobs, **fields))
        except QtoolError as exc:
            raise ApiError(400, exc.one_line(), code="invalid_value") from None
    return ids, params


async def watch_disconnect(request: Request, completion: Completion) -> None:
    """Tell the completion when its client disconnects (the task is cancelled once the reply is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    completion.leave()


async def next_events(completion: Completion) -> list[tuple[int, str, Any]]:
    """The completion's events that have come (waiting for at least one), or ClientGone when the client left."""
    await completion.wait()
    if completion.gone:
        raise ClientGone
    return completion.take()


async def accepted(completion: Completion, n: int) -> list[tuple[int, str, Any]]:
    """Wait until the engine took all n choices (before any status goes out, so a refusal is still a 400); the
    other events that came meanwhile, in order."""
    backlog = []
    taken = 0
    while taken < n:
        for event in await next_events(completion):
            if event[1] in ("refused", "failed"):
                raise failure(event[1], event[2])
            if event[1] == "accepted":
                taken += 1
            else:
                backlog.append(event)
    return backlog


def failure(kind: str, payload: BaseException) -> ApiError:
    """An error event of the engine's thread as the API reports it: a request the engine refused for a reason the
    user can fix (a QtoolError: 400), or anything else, a failed step included (500; its one line when it is a
    QtoolError, else only in the server's log)."""
    if kind == "refused" and isinstance(payload, QtoolError):
        return ApiError(400, payload.one_line(), code="invalid_value")
    why = payload.one_line() if isinstance(payload, QtoolError) else "logged on the server"
    return ApiError(500, f"the engine failed on this request ({why})", code="engine_error")


async def complete(app: FastAPI, request: Request, endpoint: str) -> Response:
    settings: ServeSettings = app.state.settings
    metrics: ServerMetrics = app.state.metrics
    try:
        body = await read_json(request, settings.max_body_bytes)
        parse = parse_chat_request if endpoint == CHAT else parse_completion_request
        parsed = parse(body, settings.max_n, settings.max_tokens_limit)
        served = find_model(app.state.served, parsed.model)
        ids, params = await run_in_threadpool(prepare, served, parsed, settings)
    except ApiError as exc:
        metrics.count(endpoint, exc.status)
        raise
    completion = Completion(asyncio.get_running_loop(), parsed.n,
                            stream_logprobs=parsed.stream and parsed.logprobs is not None,
                            pacer=app.state.pacers[served.name] if parsed.stream else None)
    for index, choice_params in enumerate(params):
        served.worker.submit(completion, index, ids, choice_params)
    gone = asyncio.ensure_future(watch_disconnect(request, completion))
    reply = Reply(parsed, served.name, len(ids), TokenTexts(served.tokenizer))
    streaming = False
    try:
        backlog = await accepted(completion, parsed.n)
        if parsed.stream:
            streaming = True  # from here the stream owns `gone` and the abort
            return EventStream(stream_events(app, served, completion, reply, backlog, gone, endpoint))
        for event in backlog:
            reply.add(event)
        while not reply.finished:
            for event in await next_events(completion):
                reply.add(event)
    except ClientGone:
        metrics.aborted[served.name] += 1
        metrics.count(endpoint, 499)
        return Response(status_code=499)
    except ApiError as exc:
        metrics.count(endpoint, exc.status)
        raise
    finally:
        if not streaming:
            gone.cancel()
            if not reply.finished:  # refused, failed, client gone or the task cancelled: free what is left
                served.worker.abort(completion)
    metrics.count(endpoint, 200)
    metrics.prompt_tokens[served.name] += reply.prompt_tokens
    metrics.completion_tokens[served.name] += reply.completion_tokens
    return JSONResponse(reply.whole())


class Reply:
    """The reply as it forms: each choice's output, built into OpenAI's whole response or stream chunks; with
    logprobs, each choice's entries not streamed yet (a chunk carries those of the tokens behind its text)."""

    def __init__(self, request: CompletionRequest, model: str, prompt_tokens: int, token_texts: TokenTexts):
        self.request, self.model, self.prompt_tokens = request, model, prompt_tokens
        self.token_texts = token_texts
        self.chat = request.kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.outputs: list[RequestOutput | None] = [None] * request.n
        self.unsent_logprobs: list[list] = [[] for _ in range(request.n)]
        self.logprob_offsets = [0] * request.n  # completions' text_offset where a choice's next chunk starts
        # a text chunk is most of what a stream sends (one per token and client): its JSON around the text and
        # the logprobs, encoded once from the dict the other chunks use (test_stream_pacing.py holds them equal)
        head, _, tail = json.dumps(self._chunk([])).rpartition('"choices": []')
        between = '"delta": {"content": ' if self.chat else '"text": '
        self._text_chunk = ("data: " + head + '"choices": [{"index": %d, ' + between + "%s"
                            + ("}" if self.chat else "") + ', "finish_reason": null, "logprobs": %s}]' + tail + "\n\n")

    @property
    def finished(self) -> bool:
        return all(o is not None for o in self.outputs)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs if o is not None)

    def add(self, event: tuple[int, str, Any]) -> None:
        index, kind, payload = event
        if kind == "logprobs":
            self.unsent_logprobs[index] += payload
        elif kind == "done":
            self.outputs[index] = payload
        elif kind in ("refused", "failed"):
            raise failure(kind, payload)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def whole(self) -> dict[str, Any]:
        choices = []
        for index, output in enumerate(self.outputs):
            # the output's text is the whole reply; the streamed pieces concatenate to it
            choice = {"index": index, "finish_reason": output.finish_reason,
                      "logprobs": None if output.logprobs is None else self._logprobs(output.logprobs)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": output.text}
            else:
                choice["text"] = output.text
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def _logprobs(self, entries: list, offset: int = 0) -> dict[str, Any]:
        if self.chat:
            return chat_logprobs(entries, self.token_texts)
        return completion_logprobs(entries, self.token_texts, offset)

    def take_logprobs(self, index: int) -> dict[str, Any] | None:
        """A stream chunk's logprobs: the choice's entries not sent yet (None when the request did not ask)."""
        if self.request.logprobs is None:
            return None
        entries, self.unsent_logprobs[index] = self.unsent_logprobs[index], []
        out = self._logprobs(entries, self.logprob_offsets[index])
        self.logprob_offsets[index] += text_length(entries, self.token_texts)
        return out

    def stream(self, events: list[tuple[int, str, Any]]) -> bytes:
        """The SSE bytes for the events that came since the last send, one write: a chunk per text piece (with the
        logprobs that came before it), as the engine made them whatever the timing, and a finished choice's last
        chunk with its finish reason."""
        out: list[str] = []
        for event in events:
            self.add(event)
            index, kind, payload = event
            if kind == "text" and payload:
                logprobs = self.take_logprobs(index)
                out.append(self._text_chunk % (index, json.dumps(payload),
                                               "null" if logprobs is None else json.dumps(logprobs)))
            elif kind == "done":
                chunk = self.chunk(index, finish_reason=payload.finish_reason,
                                   logprobs=self.take_logprobs(index))
                out.append(f"data: {json.dumps(chunk)}\n\n")
        return "".join(out).encode()

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        return self._chunk([choice])

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._chunk([]), "usage": self.usage()}


async def stream_events(app: FastAPI, served: ServedModel, completion: Completion, reply: Reply,
                        backlog: list, gone: asyncio.Future, endpoint: str) -> AsyncIterator[bytes]:
    """SSE chunks: a role chunk per choice (chat), text deltas as the engine streams them, a last chunk per choice
    with its finish reason, the usage when asked, then [DONE]. An error after the start is an {"error"} event."""
    metrics: ServerMetrics = app.state.metrics
    status = 200
    try:
        if reply.chat:
            yield b"".join(sse(reply.chunk(index, role=True)) for index in range(reply.request.n))
        events = list(backlog)
        while True:
            # what came since the last send goes out in one write: with many clients, a step's tokens together
            data = reply.stream(events)
            if data:
                yield data
            if reply.finished:
                break
            events = await next_events(completion)
        if reply.request.include_usage:
            yield sse(reply.usage_chunk())
        yield sse("[DONE]")
        metrics.prompt_tokens[served.name] += reply.prompt_tokens
        metrics.completion_tokens[served.name] += reply.completion_tokens
    except ClientGone:
        status = 499
    except ApiError as exc:
        status = exc.status
        yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        gone.cancel()
        if not reply.finished:
            served.worker.abort(completion)
            if status == 200 or status == 499:
                status = 499
                metrics.aborted[served.name] += 1
        metrics.count(endpoint, status)
