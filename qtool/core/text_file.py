"""Reading a small text file (a JSON/YAML/TOML config, a shard index) as UTF-8, with a file that is not UTF-8
text refused as one QtoolError naming it instead of a UnicodeDecodeError traceback."""

from __future__ import annotations

from pathlib import Path

from qtool.core.errors import QtoolError


def read_utf8(path: Path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QtoolError(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})", "the file is corrupt: restore or re-create it") from exc
