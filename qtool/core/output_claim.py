"""What every command that writes an output does first: check the path against its inputs, take the output's
lock for the whole run, and check that an existing output may be replaced."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qtool.core.output_lock import output_lock
from qtool.core.output_marker import check_replaceable
from qtool.core.output_path import check_output_path


@contextmanager
def claimed_output(output: Path | str, force: bool, inputs: Iterable[Path | str] = ()) -> Iterator[Path]:
    """Yield `output` as an absolute path, locked against other runs until the block ends."""
    output = check_output_path(output, inputs)
    with output_lock(output):
        check_replaceable(output, force)  # under the lock: a run that finished a moment ago has written it by now
        yield output
