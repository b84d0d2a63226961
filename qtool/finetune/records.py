"""Fine-tuning data as rows: a .txt file (one row per paragraph), JSONL/JSON/CSV/Parquet files or a cached Hub
dataset, read through `datasets`; the kind of data detected from the columns and every row checked, so that a bad
row is one error naming the file, the row and what was expected."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError
from qtool.data.text import hub_reachable

# suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# the kinds of data, by the columns that name them (checked in this order: the first that matches wins)
KIND_COLUMNS = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "triplets": ("anchor", "positive", "negative"),
    "pairs": ("anchor", "positive"),
    "text": ("text",),
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass
class Records:
    kind: str  # one of KIND_COLUMNS
    rows: list[dict[str, Any]]
    source: str  # the file or dataset name, as errors name it


def load_records(source: str | Path, option: str = "--data") -> Records:
    """The rows of `source` with their kind detected and every row checked against it."""
    rows, label = _read_rows(str(source), option)
    if not rows:
        raise QtoolError(f"{option} {label}: no rows", "pass a file with at least one example")
    kind = detect_kind(rows[0], label)
    for number, row in enumerate(rows, start=1):
        check_row(row, kind, label, number)
    return Records(kind=kind, rows=rows, source=label)


def detect_kind(row: dict[str, Any], label: str) -> str:
    for kind, columns in KIND_COLUMNS.items():
        if all(column in row for column in columns):
            return kind
    expected = "; ".join(" + ".join(columns) for columns in KIND_COLUMNS.values())
    raise QtoolError(f"{label}: row 1 has the columns {sorted(row)}, which name no kind of data",
                     f"expected one of: {expected}")


def check_row(row: dict[str, Any], kind: str, label: str, number: int) -> None:
    where = f"{label}: row {number}"
    for column in KIND_COLUMNS[kind]:
        if column not in row or row[column] is None:
            raise QtoolError(f"{where}: no '{column}'", f"every row of {kind} data needs {' + '.join(KIND_COLUMNS[kind])}")
    if kind == "chat":
        _check_messages(row["messages"], where)
        return
    for column in KIND_COLUMNS[kind]:
        if not isinstance(row[column], str) or not row[column].strip():
            raise QtoolError(f"{where}: '{column}' is {_shown(row[column])}", "expected a non-empty string")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise QtoolError(f"{where}: 'messages' is {_shown(messages)}", "expected a non-empty list of {role, content}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise QtoolError(f"{where}: messages[{index}] is {_shown(message)}", "expected {\"role\": ..., \"content\": \"text\"}")
        if message.get("role") not in CHAT_ROLES:
            raise QtoolError(f"{where}: messages[{index}] has the role {message.get('role')!r}", f"expected one of {', '.join(CHAT_ROLES)}")
    if not any(message["role"] == "assistant" for message in messages):
        raise QtoolError(f"{where}: no assistant message", "the loss is on assistant replies: each conversation needs at least one")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_rows(source: str, option: str) -> tuple[list[dict[str, Any]], str]:
    path = Path(source).expanduser()
    if path.exists():
        return _read_file(path, option), str(path)
    if path.suffix in BUILDERS or source.startswith((".", "/", "~")) or not HUB_NAME.match(source):
        raise QtoolError(f"{option} {source}: no such file", f"pass a {', '.join(BUILDERS)} file or a cached Hub dataset name")
    return _read_hub(source, option), source


def _read_file(path: Path, option: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    if not path.is_file():
        raise QtoolError(f"{option} {path}: not a regular file", f"pass a {', '.join(BUILDERS)} file")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise QtoolError(f"{option} {path}: unknown file type '{path.suffix}'", f"use one of {', '.join(BUILDERS)}")
    if path.suffix.lower() == ".jsonl":
        _check_json_lines(path)  # datasets' parse errors do not say which line
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    with tempfile.TemporaryDirectory(prefix="qtool-data-") as cache:  # never the user's datasets cache
        try:
            dataset = load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **extra)
        except Exception as exc:  # datasets wraps parse errors of each builder in its own types
            cause = exc.__cause__ or exc
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise QtoolError(f"{option} {path}: cannot be read as {builder}: {first}", f"check the file is valid {builder}") from exc
        rows = dataset.to_list()
    if builder == "text":
        # a paragraph's rows keep their line breaks, not the blank line that ends the paragraph
        rows = [{"text": row["text"].strip("\n")} for row in rows if row["text"].strip()]
    return rows


def _check_json_lines(path: Path) -> None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise QtoolError(f"{path}: not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QtoolError(f"{path}: line {number} is not JSON ({exc.msg})", "expected one JSON object per line") from exc
        if not isinstance(value, dict):
            raise QtoolError(f"{path}: line {number} is {_shown(value)}", "expected one JSON object per line")


def _read_hub(source: str, option: str) -> list[dict[str, Any]]:
    """NAME or NAME:SPLIT of a Hub dataset, from the cache when offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)."""
    import datasets.config
    from datasets import load_dataset

    name, _, split = source.partition(":")
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    hint = "pass a local file instead, or set HF_DATASETS_OFFLINE=1 to read a cached copy"
    if not offline and not hub_reachable():
        raise QtoolError(f"{option} {source}: no such file, and the Hugging Face Hub cannot be reached to load it as a dataset", hint)
    try:
        dataset = load_dataset(name, split=split or "train")
    except Exception as exc:  # ConnectionError, FileNotFoundError, ValueError... for the same cause
        reason = "it is not in the local cache (offline mode is set)" if offline else f"loading it failed ({type(exc).__name__})"
        raise QtoolError(f"{option} {source}: the dataset is unavailable: {reason}", hint) from exc
    return dataset.to_list()
