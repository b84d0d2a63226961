"""One run per output: an OS lock (flock) on a file beside the output, held for the whole run, so that a second
run writing the same output fails at once instead of mixing its work into the first one's."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from qtool.core.errors import QtoolError


def lock_file_for(output: Path) -> Path:
    return output.parent / f".{output.name}.qtool-lock"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the lock of `output` (its file records this process's id) or raise a QtoolError naming the run that
    holds it. The OS drops the lock when the process dies, however it dies."""
    output = Path(output)
    path = lock_file_for(output)
    descriptor = _acquire(path, output)
    try:
        yield
    finally:
        # Removed while still held: a run that opened the old file meanwhile sees it is gone and locks a new one.
        with suppress(OSError):
            path.unlink()
        os.close(descriptor)


def _acquire(path: Path, output: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(path.parent, exc) from exc
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(path.parent, exc) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise QtoolError(f"another qtool run is writing {output} (pid {holder})", "wait for it to finish, or choose another output path") from None
        except OSError as exc:
            os.close(descriptor)
            raise QtoolError(f"cannot lock {path}: {exc.strerror or exc}", "write the output to a local filesystem") from exc
        if _still_named(path, descriptor):
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            return descriptor
        os.close(descriptor)  # the holder finished and removed the file between our open and our lock


def _still_named(path: Path, descriptor: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _unwritable(folder: Path, exc: OSError) -> QtoolError:
    return QtoolError(f"cannot write to the folder {folder}: {exc.strerror or exc}", "choose an output in a folder you can write to")
