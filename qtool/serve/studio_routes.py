"""The studio page of `qtool serve` (GET /, its files under /static/) and the JSON routes only the page needs, under
/studio/api/: the served models with their sampling defaults (and where each came from) and template facts; the
chat template's view, live render and save; files -> labelled context blocks with the token count and what was cut;
an arena vote appended to a local JSONL file. Chat and arena replies go through the OpenAI routes (/v1/...), so
the page shows what any client gets. With an API key set, /studio/api/ needs it too (the page asks for it)."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from qtool.core.errors import QtoolError
from qtool.runtime.chat_template_source import render_template, save_template, template_source
from qtool.runtime.context_files import FIT_POLICY, ContextFile, context_file_from_bytes, fit_context
from qtool.serve.api_errors import ApiError
from qtool.serve.guard import bearer_ok
from qtool.serve.model_pool import ServedModel
from qtool.serve.settings import ServeSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"studio.js": "text/javascript", "studio.css": "text/css"}  # what /static/ serves, nothing else
DEFAULT_VOTES_FILE = Path("arena-votes.jsonl")  # relative: beside where `qtool serve` runs
VOTE_CHOICES = ("tie", "both bad")  # besides a model's name


def model_directory(served: ServedModel) -> Path | None:
    """The directory a served model was loaded from (where chat_template.jinja is saved), None for a GGUF file,
    a Hub id or an alias."""
    path = Path(served.source)
    return path if path.is_dir() and (path / "config.json").is_file() else None


class StudioState:
    """What the studio routes share for the server's life: each model's session template (a copy of the
    tokenizer's, kept to tell 'session' from 'shipped'), and the lock that serialises vote appends."""

    def __init__(self, votes_path: Path):
        self.votes_path = votes_path
        self.session_templates: dict[str, str] = {}
        self.votes_lock = threading.Lock()


def studio_router(models: Sequence[ServedModel], settings: ServeSettings) -> APIRouter:
    """The page and its routes for `models`; arena votes go to settings.arena_votes (default ./arena-votes.jsonl)."""
    served = {m.name: m for m in models}
    state = StudioState(Path(settings.arena_votes) if settings.arena_votes else DEFAULT_VOTES_FILE)

    def authorized(request: Request) -> None:
        if settings.api_key and not bearer_ok(dict(request.scope.get("headers") or []), settings.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def model_named(name: Any) -> ServedModel:
        if not isinstance(name, str) or name not in served:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(served)}", param="model",
                           code="model_not_found")
        return served[name]

    page = APIRouter()
    api = APIRouter(prefix="/studio/api", dependencies=[Depends(authorized)])

    @page.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"cache-control": "no-cache"})

    @page.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise ApiError(404, f"no studio file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"cache-control": "no-cache"})

    @api.get("/models")
    async def studio_models() -> dict[str, Any]:
        return {"models": [model_facts(m, state) for m in served.values()], "votes_file": str(state.votes_path),
                "fit_policy": FIT_POLICY, "require_key": bool(settings.api_key)}

    @api.get("/template")
    async def template_view(model: str) -> dict[str, Any]:
        target = model_named(model)
        source = template_source(target.tokenizer, model_directory(target), state.session_templates.get(target.name))
        rendered = await run_in_threadpool(render_template, target.tokenizer, source.template)
        return {**source.to_dict(), "render": rendered.to_dict(), "can_save": model_directory(target) is not None}

    @api.post("/template/render")
    async def template_render(request: Request) -> dict[str, Any]:
        body = await json_object(request)
        target = model_named(body.get("model"))
        template = text_field(body, "template")
        return (await run_in_threadpool(render_template, target.tokenizer, template)).to_dict()

    @api.post("/template/save")
    async def template_save(request: Request) -> dict[str, Any]:
        """scope "model": chat_template.jinja next to the model (and in use now); "session": in use until the
        server stops, nothing written."""
        body = await json_object(request)
        target = model_named(body.get("model"))
        template = text_field(body, "template")
        scope = body.get("scope", "model")
        if scope not in ("model", "session"):
            raise ApiError(400, f"scope={scope!r} is invalid: 'model' (saved beside it) or 'session'", param="scope")
        rendered = await run_in_threadpool(render_template, target.tokenizer, template)
        if not rendered.ok:
            raise ApiError(400, f"the template does not render: {rendered.error}", param="template",
                           code="template_error")
        if scope == "session":
            target.tokenizer.chat_template = template
            state.session_templates[target.name] = template
            return {"saved": None, "scope": "session"}
        directory = model_directory(target)
        if directory is None:
            raise ApiError(400, f"model {target.name!r} was not loaded from a model directory ({target.source}), so "
                           "there is nowhere to save chat_template.jinja: use scope 'session'", param="scope")
        try:
            path = await run_in_threadpool(save_template, target.tokenizer, template, directory)
        except QtoolError as exc:
            raise ApiError(400, exc.one_line(), param="template", code="template_error") from None
        state.session_templates.pop(target.name, None)
        return {"saved": str(path), "scope": "model"}

    @api.post("/context")
    async def context(request: Request) -> dict[str, Any]:
        """{model, messages, files: [{name, data (base64)}], max_tokens} -> the messages to send (files in front of
        the last user message, cut to fit), the token counts and the cuts."""
        body = await json_object(request)
        target = model_named(body.get("model"))
        messages = chat_messages(body.get("messages"))
        files = context_files(body.get("files", []))
        reserve = body.get("max_tokens", 0)
        if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
            raise ApiError(400, f"max_tokens={reserve!r} is invalid: an integer >= 0", param="max_tokens")
        try:
            fit = await run_in_threadpool(fit_context, target.tokenizer, messages, files, target.context_length,
                                          reserve, raw=not getattr(target.tokenizer, "chat_template", None))
        except QtoolError as exc:
            raise ApiError(400, exc.one_line(), param="files", code="context_length_exceeded") from None
        return {**fit.to_dict(), "messages": fit.messages}

    @api.post("/arena/vote")
    async def vote(request: Request) -> dict[str, Any]:
        """{prompt, models: [names], winner: a name, 'tie' or 'both bad', replies?: {name: {text, ttft_s, ...}}}
        -> one line appended to the votes file."""
        body = await json_object(request)
        names = body.get("models")
        if not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) != len(names):
            raise ApiError(400, "models must list two or more distinct served models", param="models")
        for name in names:
            model_named(name)
        winner = body.get("winner")
        if winner not in (*names, *VOTE_CHOICES):
            raise ApiError(400, f"winner={winner!r} is invalid: one of {', '.join(map(repr, [*names, *VOTE_CHOICES]))}",
                           param="winner")
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prompt": text_field(body, "prompt"),
                  "models": names, "winner": winner}
        if isinstance(body.get("replies"), dict):
            record["replies"] = body["replies"]
        await run_in_threadpool(append_vote, state, record)
        return {"saved": str(state.votes_path), "record": record}

    page.include_router(api)
    return page


def model_facts(served: ServedModel, state: StudioState) -> dict[str, Any]:
    """What the page shows per model: its context, the sampling controls' defaults (each with its source:
    generation_config.json or the engine default) and its template's origin."""
    source = template_source(served.tokenizer, model_directory(served), state.session_templates.get(served.name))
    return {"name": served.name, "source": served.source, "context_length": served.context_length,
            "sampling_defaults": served.defaults.to_dict(), "template_origin": source.origin,
            "template_reason": source.reason, "has_chat_template": bool(getattr(served.tokenizer, "chat_template", None)),
            "can_save_template": model_directory(served) is not None}


def append_vote(state: StudioState, record: dict[str, Any]) -> None:
    with state.votes_lock:
        try:
            state.votes_path.parent.mkdir(parents=True, exist_ok=True)
            with state.votes_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise ApiError(500, f"cannot append the vote to {state.votes_path}: {exc.strerror}",
                           code="votes_file_unwritable") from None


async def json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string", param=name)
    return value


def chat_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant")
                or not isinstance(message.get("content"), str)):
            raise ApiError(400, f"message {message!r} is invalid: {{role: system|user|assistant, content: text}}",
                           param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def context_files(value: Any) -> list[ContextFile]:
    if not isinstance(value, list):
        raise ApiError(400, "files must be a list of {name, data (base64)}", param="files")
    files = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("data"), str):
            raise ApiError(400, "each file must be {name, data (base64)}", param="files")
        try:
            data = base64.b64decode(item["data"], validate=True)
            files.append(context_file_from_bytes(item["name"], data))
        except binascii.Error:
            raise ApiError(400, f"file {item['name']}: data is not base64", param="files") from None
        except QtoolError as exc:
            raise ApiError(400, exc.one_line(), param="files", code="unreadable_file") from None
    return files
