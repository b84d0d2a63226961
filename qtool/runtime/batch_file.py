"""The files of an offline batch: requests read from JSONL and checked line by line (one error naming the file, the
line and the field), outputs written as JSONL through a temporary file renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from qtool.core.errors import QtoolError
from qtool.core.json_values import is_int, is_number
from qtool.runtime.generate import GenerationSettings, Message
from qtool.runtime.token_logprobs import MAX_TOP_LOGPROBS, valid_top_logprobs


# per-request settings: JSON field (a GenerationSettings field of the same name) -> (valid?, what is valid)
SAMPLING_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0 (0 is greedy)"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 switches it off)"),
    "min_p": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number above 0 (1 switches it off)"),
    "seed": (lambda v: v is None or (is_int(v) and v >= 0), "an integer >= 0 or null"),
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "stop": (lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and all(isinstance(s, str) and s for s in v)),
             "a non-empty string or a list of them"),
}
FIELDS_HINT = ("each line is one JSON object: \"id\" (unique), \"prompt\" (text) or \"messages\" ([{\"role\", \"content\"}]), "
               "and optionally " + ", ".join(SAMPLING_FIELDS) + f", logprobs (0..{MAX_TOP_LOGPROBS} alternatives per token)")


@dataclass(frozen=True)
class BatchRequest:
    id: str | int
    prompt: str | None = None  # raw text, sent as it is
    messages: list[Message] | None = None  # a chat, through the tokenizer's chat template
    settings: dict[str, Any] = field(default_factory=dict)  # this request's own values of SAMPLING_FIELDS
    line: int = 0  # where it was read (0: built in code)
    logprobs: int | None = None  # k: each output token's logprob and its k most likely alternatives (engine only)

    @property
    def conversation(self) -> str | list[Message]:
        return self.prompt if self.prompt is not None else self.messages

    def settings_over(self, defaults: GenerationSettings) -> GenerationSettings:
        """The run's settings with this request's own values in place."""
        return replace(defaults, **{k: tuple(v) if k == "stop" and isinstance(v, list) else v for k, v in self.settings.items()})


def read_batch_requests(path: str | Path) -> list[BatchRequest]:
    """The requests of a JSONL batch file, in file order (blank lines skipped); the first bad line is refused."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QtoolError(f"batch file {path} does not exist", "give a JSONL file: " + FIELDS_HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QtoolError(f"cannot read batch file {path}: {getattr(exc, 'strerror', None) or exc}", "give a UTF-8 JSONL file") from exc
    requests: list[BatchRequest] = []
    first_line_of: dict[Any, int] = {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            request = _parse_line(path, number, line)
            key = (type(request.id), request.id)
            if key in first_line_of:
                raise QtoolError(f"{path} line {number}: id {request.id!r} repeats the id of line {first_line_of[key]}", "give every request its own id")
            first_line_of[key] = number
            requests.append(request)
    if not requests:
        raise QtoolError(f"batch file {path} holds no requests", FIELDS_HINT)
    return requests


def _parse_line(path: Path, number: int, line: str) -> BatchRequest:
    def refuse(what: str, hint: str = FIELDS_HINT) -> QtoolError:
        return QtoolError(f"{path} line {number}: {what}", hint)

    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise refuse(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise refuse(f"expected a JSON object, got {type(data).__name__}")
    unknown = [key for key in data if key not in ("id", "prompt", "messages", "logprobs", *SAMPLING_FIELDS)]
    if unknown:
        raise refuse(f"unknown field '{unknown[0]}'")
    if "id" not in data:
        raise refuse("field 'id' is missing")
    request_id = data["id"]
    if not ((isinstance(request_id, str) and request_id) or is_int(request_id)):
        raise refuse(f"field 'id' must be a non-empty string or an integer, got {request_id!r}")
    if ("prompt" in data) == ("messages" in data):
        raise refuse("give exactly one of the fields 'prompt' and 'messages'" + (", not both" if "prompt" in data else ""))
    prompt, messages = data.get("prompt"), data.get("messages")
    if "prompt" in data and not (isinstance(prompt, str) and prompt):
        raise refuse(f"field 'prompt' must be a non-empty string, got {prompt!r}")
    if "messages" in data and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values()) for m in messages)):
        raise refuse("field 'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
    for name, (valid, what) in SAMPLING_FIELDS.items():
        if name in data and not valid(data[name]):
            raise refuse(f"field '{name}' must be {what}, got {data[name]!r}")
    logprobs = data.get("logprobs")
    if logprobs is not None and not valid_top_logprobs(logprobs):
        raise refuse(f"field 'logprobs' must be an integer in 0..{MAX_TOP_LOGPROBS} (alternatives per token) or null, "
                     f"got {logprobs!r}")
    settings = {name: data[name] for name in SAMPLING_FIELDS if name in data}
    return BatchRequest(request_id, prompt, messages, settings, number, logprobs)


def write_jsonl_atomically(path: str | Path, rows: Iterable[dict[str, Any]], force: bool = False) -> None:
    """One JSON object per line, written to a temporary file beside `path` and renamed onto it, so a failed run never
    leaves half a file; an existing `path` is replaced only with force."""
    path = Path(path)
    if path.is_dir():
        raise QtoolError(f"output {path} is a directory", "give a file path for the JSONL outputs")
    if path.exists() and not force:
        raise QtoolError(f"output {path} already exists", "pass --force to replace it, or choose another output path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    except OSError as exc:
        raise QtoolError(f"cannot write {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(temporary, 0o644)  # mkstemp makes it private; an output reads like any file a tool writes
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise QtoolError(f"cannot write {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
        raise
