"""The marker file in every output qtool writes, so that --force replaces only what qtool wrote and never a folder
of other files; a dotfile (not *.json at the top level of a name loaders look for), which model loaders ignore."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from qtool.core.errors import QtoolError

MARKER_FILE = ".qtool-output.json"


def write_marker(directory: Path, what: str) -> None:
    try:
        version = metadata.version("qtool")
    except metadata.PackageNotFoundError:
        version = "unknown"
    (Path(directory) / MARKER_FILE).write_text(json.dumps({"written_by": "qtool", "version": version, "what": what}) + "\n")


def is_qtool_output(path: Path) -> bool:
    return path.is_dir() and (path / MARKER_FILE).is_file()


def check_replaceable(path: Path, force: bool) -> None:
    """Raise a QtoolError unless `path` is free, or force is given and it is an output qtool wrote (or an empty
    folder: nothing in it can be lost)."""
    path = Path(path)
    if not path.exists():
        return
    if not force:
        raise QtoolError(f"output {path} already exists", "pass --force to replace it, or choose another output path")
    if is_qtool_output(path) or (path.is_dir() and not any(path.iterdir())):
        return
    what = "a file" if not path.is_dir() else f"a folder qtool did not write (it has no {MARKER_FILE})"
    raise QtoolError(f"--force replaces only outputs qtool wrote, and {path} is {what}",
                     "choose another output path, or remove it yourself if it is meant to go")
