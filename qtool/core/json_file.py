"""Reading a JSON file that must hold an object (config.json, an index, a quantization config): every way it can
fail is one QtoolError naming the file, with the caller's fix as hint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError


def read_json_file(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a missing, unreadable, invalid or non-object file raises QtoolError whose
    message starts with the path and whose hint is `fix`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QtoolError(f"{path} is missing", fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise QtoolError(f"{path} cannot be read: {reason}", fix) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QtoolError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", fix) from None
    if not isinstance(data, dict):
        raise QtoolError(f"{path} must hold a JSON object, not a {type(data).__name__}", fix)
    return data
