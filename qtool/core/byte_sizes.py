"""Sizes in bytes as people write them on a command line ("5GB", "500MB", "2GiB", "123456"), the way
transformers' max_shard_size reads them: kB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024."""

from __future__ import annotations

import re

from qtool.core.errors import QtoolError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_byte_size(text: str, option: str) -> int:
    """The number of bytes `text` names (at least 1); a one-line error naming `option` otherwise."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in UNITS:
        raise QtoolError(f"{option} {text!r} is not a size", "write a number of bytes or one with a unit: 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * UNITS[unit])
    if size < 1:
        raise QtoolError(f"{option} {text!r} is not a positive size", "write a size of at least 1 byte, e.g. 5GB")
    return size
