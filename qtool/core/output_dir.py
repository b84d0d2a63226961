"""Atomic output directories: writers fill a temporary sibling directory that replaces the target only once the
whole write succeeded (with qtool's marker in it), so a failed run never leaves a half-written or half-replaced output."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qtool.core.errors import QtoolError
from qtool.core.output_marker import check_replaceable, write_marker
from qtool.core.output_path import check_output_path

_DIR_MODE = 0o755  # mkdtemp creates 0o700; outputs should be readable like any directory a tool writes


@contextmanager
def atomic_output_dir(path: Path, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`; on success it gets the marker (saying `what` it
    holds) and is renamed to `path` (an existing `path` is replaced only then, only with force and only if qtool
    wrote it); on an exception it is removed and `path` left as it was."""
    path = check_output_path(path)
    check_replaceable(path, force)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=parent))
    except OSError as exc:
        raise QtoolError(f"cannot create output directory next to {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
    try:
        os.chmod(staging, _DIR_MODE)
        yield staging
        write_marker(staging, what)
        _replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, path: Path) -> None:
    """Move `staging` to `path`, putting any previous output aside first and back if the move fails."""
    previous = None
    if path.exists() or path.is_symlink():
        previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.previous-", dir=path.parent)) / "old"
        path.rename(previous)
    try:
        staging.rename(path)
    except OSError as exc:
        if previous is not None:
            previous.rename(path)
            shutil.rmtree(previous.parent, ignore_errors=True)
        raise QtoolError(f"cannot move the finished output into {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
    if previous is not None:
        shutil.rmtree(previous.parent, ignore_errors=True)  # unlinks a symlinked old output, never its target
