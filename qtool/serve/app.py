"""The OpenAI-compatible API over the served models' engines: POST /v1/chat/completions and /v1/completions
(streamed as server-sent events, or whole), GET /v1/models, /health and /metrics. Every request of a model joins its
engine's continuous batch through the model's worker thread; a client that disconnects is aborted at once (its
sequence and blocks freed before the engine's next step). Errors use OpenAI's shape; see protocol.py for the fields."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from qtool.core.errors import QtoolError
from qtool.runtime.engine import RequestOutput, SamplingParams
from qtool.runtime.generate import has_chat_template, prompt_ids
from qtool.serve.api_errors import ApiError, error_body
from qtool.serve.guard import Guard, ServerState
from qtool.serve.metrics import ServerMetrics, prometheus_text
from qtool.serve.model_pool import Completion, ServedModel
from qtool.serve.protocol import CompletionRequest, parse_chat_request, parse_completion_request
from qtool.serve.settings import ServeSettings
from qtool.serve.studio_routes import studio_router

logger = logging.getLogger(__name__)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""


def create_app(models: Sequence[ServedModel], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The server app. app.state holds `served` (name -> ServedModel), `settings`, `metrics` (ServerMetrics) and
    `server` (ServerState: draining, in-flight count) for the routes other modules add."""
    served = {m.name: m for m in models}
    if len(served) != len(models):
        raise QtoolError("two served models share a name", "give each model its own name")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in models:
            model.start()
        yield
        for model in models:  # after uvicorn drained the requests in flight
            await run_in_threadpool(model.stop)

    app = FastAPI(title="qtool serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.server = ServerState()
    app.add_middleware(Guard, state=app.state.server, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, f"invalid request: {exc.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the guard logs it once the error middleware re-raises it
        return JSONResponse(error_body(500, "internal server error (logged on the server)", code="internal_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "draining" if app.state.server.draining else "ok", "models": list(served)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in served.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return model_card(find_model(served, name))

    @app.get("/metrics")
    async def metrics(request: Request, format: str | None = None) -> Response:
        report = app.state.metrics.report(list(served.values()), app.state.server.in_flight)
        accept = request.headers.get("accept", "")
        if format == "prometheus" or (format is None and ("text/plain" in accept or "openmetrics" in accept)):
            return PlainTextResponse(prometheus_text(report), media_type="text/plain; version=0.0.4")
        if format not in (None, "json", "prometheus"):
            raise ApiError(400, f"format={format!r} is invalid: json or prometheus", param="format")
        return JSONResponse(report)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await complete(app, request, CHAT)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await complete(app, request, COMPLETIONS)

    app.include_router(studio_router(models, settings))  # the studio page at / and its /studio/api routes
    return app


def model_card(model: ServedModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "qtool",
            "context_length": model.context_length, "sampling_defaults": model.defaults.to_dict()}


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
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


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
            params.append(SamplingParams(max_tokens=max_tokens, **fields))
        except QtoolError as exc:
            raise ApiError(400, exc.one_line(), code="invalid_value") from None
    return ids, params


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(completion: Completion, gone: asyncio.Future) -> tuple[int, str, Any]:
    """The completion's next event, or ClientGone when the client left first."""
    get = asyncio.ensure_future(completion.queue.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise ClientGone


def failure(kind: str, payload: BaseException) -> ApiError:
    """An error event of the engine's thread as the API reports it: a request the engine refused (400), or a step
    that failed (500; a QtoolError says why in one line, anything else is in the server's log)."""
    if kind == "refused":
        return ApiError(400, payload.one_line() if isinstance(payload, QtoolError) else str(payload),
                        code="invalid_value")
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
    completion = Completion(asyncio.get_running_loop(), parsed.n)
    for index, choice_params in enumerate(params):
        served.worker.submit(completion, index, ids, choice_params)
    gone = asyncio.ensure_future(wait_disconnect(request))
    reply = Reply(parsed, served.name, len(ids))
    try:
        # every choice accepted (or refused) before a status goes out: a refusal is still a 400
        backlog = []
        accepted = 0
        while accepted < parsed.n:
            event = await next_event(completion, gone)
            if event[1] in ("refused", "failed"):
                raise failure(event[1], event[2])
            if event[1] == "accepted":
                accepted += 1
            else:
                backlog.append(event)
    except ClientGone:
        served.worker.abort(completion)
        metrics.aborted[served.name] += 1
        metrics.count(endpoint, 499)
        gone.cancel()
        return Response(status_code=499)
    except ApiError as exc:
        served.worker.abort(completion)
        metrics.count(endpoint, exc.status)
        gone.cancel()
        raise
    if parsed.stream:
        return EventStream(stream_events(app, served, completion, reply, backlog, gone, endpoint))
    try:
        for event in backlog:
            reply.add(event)
        while not reply.finished:
            reply.add(await next_event(completion, gone))
    except ClientGone:
        served.worker.abort(completion)
        metrics.aborted[served.name] += 1
        metrics.count(endpoint, 499)
        return Response(status_code=499)
    except ApiError as exc:
        served.worker.abort(completion)
        metrics.count(endpoint, exc.status)
        raise
    finally:
        gone.cancel()
    metrics.count(endpoint, 200)
    metrics.prompt_tokens[served.name] += reply.prompt_tokens
    metrics.completion_tokens[served.name] += reply.completion_tokens
    return JSONResponse(reply.whole())


class Reply:
    """The reply as it forms: each choice's text and its output, built into OpenAI's whole response or chunks."""

    def __init__(self, request: CompletionRequest, model: str, prompt_tokens: int):
        self.request, self.model, self.prompt_tokens = request, model, prompt_tokens
        self.chat = request.kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [""] * request.n
        self.outputs: list[RequestOutput | None] = [None] * request.n

    @property
    def finished(self) -> bool:
        return all(o is not None for o in self.outputs)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs if o is not None)

    def add(self, event: tuple[int, str, Any]) -> None:
        index, kind, payload = event
        if kind == "text":
            self.texts[index] += payload
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
            choice = {"index": index, "finish_reason": output.finish_reason, "logprobs": None}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": output.text}
            else:
                choice["text"] = output.text
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return self._chunk([choice])

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._chunk([]), "usage": self.usage()}


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def stream_events(app: FastAPI, served: ServedModel, completion: Completion, reply: Reply,
                        backlog: list, gone: asyncio.Future, endpoint: str) -> AsyncIterator[bytes]:
    """SSE chunks: a role chunk per choice (chat), text deltas as the engine streams them, a last chunk per choice
    with its finish reason, the usage when asked, then [DONE]. An error after the start is an {"error"} event."""
    metrics: ServerMetrics = app.state.metrics
    status = 200
    try:
        if reply.chat:
            for index in range(reply.request.n):
                yield sse(reply.chunk(index, role=True))
        pending = list(backlog)
        while not reply.finished:
            event = pending.pop(0) if pending else await next_event(completion, gone)
            reply.add(event)
            index, kind, payload = event
            if kind == "text" and payload:
                yield sse(reply.chunk(index, text=payload))
            elif kind == "done":
                yield sse(reply.chunk(index, finish_reason=payload.finish_reason))
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


class EventStream(Response):
    """A text/event-stream response of the chunks an async iterator yields. The iterator ends (ClientGone, its
    finally aborting the request) when the client disconnects; a send that fails ends it the same way."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes]):
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send (ASGI 2.4 servers raise it): stop generating for it
            pass
        finally:
            await self.chunks.aclose()
