"""The OpenAI-compatible API over the served models' engines: POST /v1/chat/completions and /v1/completions
(completions.py: streamed as server-sent events, or whole), GET /v1/models, /health and /metrics, the guard in front
(guard.py) and the error handlers that keep every error in OpenAI's shape."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from qtool.core.errors import QtoolError
from qtool.serve.api_errors import ApiError, error_body
from qtool.serve.completions import CHAT, COMPLETIONS, complete, find_model
from qtool.serve.guard import Guard, ServerState
from qtool.serve.metrics import ServerMetrics, prometheus_text
from qtool.serve.model_pool import ServedModel
from qtool.serve.settings import ServeSettings
from qtool.serve.stream_pacing import StreamPacer
from qtool.serve.studio_routes import studio_router


def create_app(models: Sequence[ServedModel], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The server app. app.state holds `served` (name -> ServedModel), `settings`, `metrics` (ServerMetrics),
    `server` (ServerState: draining, in-flight count) and `pacers` (name -> the StreamPacer of its streams) for the
    routes other modules add."""
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
    app.state.pacers = {m.name: StreamPacer(cpu_budget=settings.stream_cpu_budget) for m in models}
    known = {CHAT, COMPLETIONS, "/v1/models", "/metrics", "/health"}

    def count_refusal(path: str, status: int) -> None:  # any other path as "other": a scan cannot grow the counts
        app.state.metrics.count(path if path in known else "other", status)

    app.add_middleware(Guard, state=app.state.server, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       count=count_refusal)

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
        report = app.state.metrics.report(list(served.values()), app.state.server.in_flight, app.state.pacers)
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
    # the page and its files carry no secrets and ask for the key themselves; /studio/api stays behind it
    app.state.server.public_paths.add("/")
    app.state.server.public_prefixes.append("/static/")
    return app


def model_card(model: ServedModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "qtool",
            "context_length": model.context_length, "sampling_defaults": model.defaults.to_dict()}
