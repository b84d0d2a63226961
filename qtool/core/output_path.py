"""Where an output may go: never a filesystem root, a mount point, the home or current directory or a folder that
holds them, never an input, inside one or around one, and only under folders that can be written."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from qtool.core.errors import QtoolError

NEW_FOLDER_HINT = "name a new folder for the output, e.g. ./model-gptq"


def check_output_path(output: Path | str, inputs: Iterable[Path | str] = ()) -> Path:
    """Raise a QtoolError (one line: what the output would replace, or which folder can't be written) unless
    `output` is a path qtool may create or replace; return it absolute. `inputs` are files or folders the run reads."""
    given = str(output)
    absolute = Path(os.path.abspath(given))  # lexical: a symlinked output is replaced as a link, never its target
    real = absolute.resolve()  # what the path means on disk, to compare with the inputs and the reserved folders
    reserved = _reserved_as(real)
    if reserved:
        raise QtoolError(f"output {given} is {reserved}: writing it would replace the folder and everything in it", NEW_FOLDER_HINT)
    for source in inputs:
        _check_apart(given, real, source)
    _check_writable(absolute)
    return absolute


def _reserved_as(real: Path) -> str | None:
    """What `real` is, when it is a folder no output may replace."""
    cwd, home = Path.cwd().resolve(), _home()
    if real == Path(real.anchor):
        return "a filesystem root"
    if real == cwd:
        return "the current directory"
    if real == home:
        return "your home directory"
    if cwd.is_relative_to(real):
        return "a folder that holds the current directory"
    if home.is_relative_to(real):
        return "a folder that holds your home directory"
    if os.path.ismount(real):
        return "a mount point"
    return None


def _home() -> Path:
    try:
        return Path.home().resolve()
    except RuntimeError:  # no HOME and no password entry: there is no home folder to protect
        return Path("/nonexistent-home")


def _check_apart(given: str, real: Path, source: Path | str) -> None:
    source_real = Path(source).resolve()
    if real == source_real:
        raise QtoolError(f"output {given} is the input {source}", "choose another output path: writing it would replace the input")
    if real.is_relative_to(source_real):
        raise QtoolError(f"output {given} is inside the input {source}", "choose an output path outside the input")
    if source_real.is_relative_to(real):
        raise QtoolError(f"the input {source} is inside the output {given}", "choose an output path that does not hold the input: replacing it would delete the input")


def _check_writable(absolute: Path) -> None:
    """The output and its temporary siblings are created in its parent: the nearest folder of it that exists
    must be a folder this process can write."""
    folder = absolute.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise QtoolError(f"cannot write the output under {folder}: it is a file, not a folder", "choose an output path whose parents are folders")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QtoolError(f"cannot write to the folder {folder}: permission denied", "choose an output in a folder you can write to, or change its permissions")
