"""The OpenAI request bodies this server takes (/v1/chat/completions and /v1/completions), checked field by field
into a CompletionRequest; anything it cannot honour is a 400 naming the field. Torch-free.

Sampling fields: temperature, top_p, seed, stop, max_tokens (chat: also max_completion_tokens), n, stream and
stream_options.include_usage; beyond OpenAI's (vLLM's spelling): top_k, min_p, repetition_penalty, ignore_eos.
Logprobs (runtime/token_logprobs.py: the model's own log-softmax, every generated token): chat's logprobs true with
top_logprobs 0..20 (top_logprobs above 0 needs logprobs true); completions' logprobs 0..20 (alternatives per token).
Accepted only at their neutral values (the engine has no such feature): frequency_penalty and presence_penalty 0,
logit_bias empty, tools empty, tool_choice "none", response_format {"type": "text"}; completions: echo false,
best_of 1, suffix null.
Ignored (they change nothing about the reply): user, metadata, store, service_tier, parallel_tool_calls, and a
message's name. Roles: system, developer (as system), user, assistant; content is text or a list of text parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from qtool.core.json_values import is_int, is_number
from qtool.runtime.token_logprobs import MAX_TOP_LOGPROBS, valid_top_logprobs
from qtool.serve.api_errors import ApiError

IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class CompletionRequest:
    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict[str, str]] | None = None  # chat: {"role", "content"} with text content
    prompt: str | list[int] | None = None  # completion: text, or token ids
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields the request set (not max_tokens)
    max_tokens: int | None = None  # None: the server's limit, cut where the model's context ends
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k most likely alternatives


# field -> (valid?, what is valid); null is always accepted and means "the default"
SAMPLING_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0 (0 is greedy)"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and v >= -1, "an integer >= 0 (0 or -1 switch it off)"),
    "min_p": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number above 0 (1 switches it off)"),
    "seed": (lambda v: is_int(v) and 0 <= v < 2**63, "an integer in 0..2**63-1"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
}
# accepted only at these values: what the engine does anyway
NEUTRAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (lambda v: is_number(v) and v == 0, "0: not served; use repetition_penalty"),
    "presence_penalty": (lambda v: is_number(v) and v == 0, "0: not served; use repetition_penalty"),
    "logit_bias": (lambda v: v == {}, "empty: logit_bias is not served"),
}
CHAT_NEUTRAL = {
    "tools": (lambda v: v == [], "empty: tool calls are not served"),
    "functions": (lambda v: v == [], "empty: function calls are not served"),
    "tool_choice": (lambda v: v == "none", '"none": tool calls are not served'),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}: structured output is not served'),
}
COMPLETION_NEUTRAL = {
    "echo": (lambda v: v is False, "false: echo is not served"),
    "best_of": (lambda v: is_int(v) and v == 1, "1: best_of is not served"),
    "suffix": (lambda v: False, "null: suffix is not served"),
}
COMMON = {"model", "stream", "stream_options", "stop", "max_tokens", "n"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"} | set(SAMPLING_FIELDS) | set(NEUTRAL_FIELDS) | set(CHAT_NEUTRAL) | set(IGNORED_FIELDS)
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs"} | set(SAMPLING_FIELDS) | set(NEUTRAL_FIELDS) | set(COMPLETION_NEUTRAL) | set(IGNORED_FIELDS)


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_chat_request(body: Any, max_n: int, max_tokens_limit: int) -> CompletionRequest:
    body = _object(body)
    _known_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    _neutral(body, CHAT_NEUTRAL)
    tokens = body.get("max_completion_tokens")
    if tokens is None:
        tokens = body.get("max_tokens")
    return CompletionRequest("chat", _model(body), messages=_messages(body.get("messages")),
                             logprobs=_chat_logprobs(body.get("logprobs"), body.get("top_logprobs")),
                             **_common(body, tokens, "max_completion_tokens" if body.get("max_completion_tokens")
                                       is not None else "max_tokens", max_n, max_tokens_limit))


def parse_completion_request(body: Any, max_n: int, max_tokens_limit: int) -> CompletionRequest:
    body = _object(body)
    _known_fields(body, COMPLETION_FIELDS, "/v1/completions")
    _neutral(body, COMPLETION_NEUTRAL)
    logprobs = body.get("logprobs")
    if logprobs is not None and not valid_top_logprobs(logprobs):
        raise bad("logprobs", f"logprobs={logprobs!r} is invalid: it must be null or an integer in 0..{MAX_TOP_LOGPROBS} "
                  "(the most likely alternatives listed per token)")
    return CompletionRequest("completion", _model(body), prompt=_prompt(body.get("prompt")), logprobs=logprobs,
                             **_common(body, body.get("max_tokens"), "max_tokens", max_n, max_tokens_limit))


def _chat_logprobs(logprobs: Any, top: Any) -> int | None:
    """Chat's pair: logprobs (true: serve them) and top_logprobs (alternatives per token) -> the engine's count."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad("logprobs", f"logprobs={logprobs!r} is invalid: it must be true or false")
    if top is not None and not valid_top_logprobs(top):
        raise bad("top_logprobs", f"top_logprobs={top!r} is invalid: it must be an integer in 0..{MAX_TOP_LOGPROBS}")
    if top and not logprobs:
        raise bad("top_logprobs", f"top_logprobs={top} needs logprobs: true")
    return (top or 0) if logprobs else None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _known_fields(body: dict[str, Any], known: set[str], endpoint: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(unknown[0], f"{endpoint} does not take the field(s) {', '.join(map(repr, unknown))}; it takes "
                  f"{', '.join(sorted(known))}", code="unknown_field")


def _neutral(body: dict[str, Any], endpoint_neutral: dict) -> None:
    for name, (ok, valid) in {**NEUTRAL_FIELDS, **endpoint_neutral}.items():
        value = body.get(name)
        if value is not None and not ok(value):
            raise bad(name, f"{name}={value!r} is not supported: only {valid}", code="unsupported_value")


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model must be the name of a served model (GET /v1/models lists them)",
                  code="missing_model" if model is None else "invalid_value")
    return model


def _common(body: dict[str, Any], max_tokens: Any, tokens_field: str, max_n: int,
            max_tokens_limit: int) -> dict[str, Any]:
    sampling: dict[str, Any] = {}
    for name, (ok, valid) in SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not ok(value):
            raise bad(name, f"{name}={value!r} is invalid: it must be {valid}")
        sampling[name] = max(value, 0) if name == "top_k" else value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
            raise bad("stop", f"stop={stop!r} is invalid: it must be a non-empty string or a list of at most 16")
        sampling["stop"] = tuple(stops)
    if max_tokens is not None and not (is_int(max_tokens) and 1 <= max_tokens <= max_tokens_limit):
        raise bad(tokens_field, f"{tokens_field}={max_tokens!r} is invalid: it must be an integer in 1..{max_tokens_limit}")
    n = body.get("n")
    if n is not None and not (is_int(n) and 1 <= n <= max_n):
        raise bad("n", f"n={n!r} is invalid: it must be an integer in 1..{max_n}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"stream={stream!r} is invalid: it must be true or false")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options", f"stream_options={options!r} is invalid: it may hold include_usage (true/false)")
    if options is not None and not stream:
        raise bad("stream_options", "stream_options goes with stream: true")
    return dict(sampling=sampling, max_tokens=max_tokens, n=n or 1, stream=bool(stream),
                include_usage=bool((options or {}).get("include_usage")))


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise bad(where, f"{where} must be an object whose role is one of {', '.join(CHAT_ROLES)}")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise bad(where, f"{where} has field(s) {', '.join(map(repr, extra))} this server does not take "
                      "(role, content, name)", code="unknown_field")
        out.append({"role": CHAT_ROLES[message["role"]], "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    """Text content: a string, or a list of {"type": "text", "text"} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"{where}.content", f"{where}.content must be text (a string or a list of text parts)")


def _prompt(prompt: Any) -> str | list[int]:
    """A string, token ids, or a list holding one of them (a batch of several prompts is refused)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(is_int(t) and t >= 0 for t in prompt):
        return list(prompt)
    raise bad("prompt", "prompt must be a non-empty string or a non-empty list of token ids (one prompt per request)")
