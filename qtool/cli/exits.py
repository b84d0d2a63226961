"""How a qtool run ends when it does not end well: the exit codes, the one line for Ctrl-C and for a bug, and
whether --debug asked for tracebacks instead. Standard library only: the entry point uses it before any import."""

from __future__ import annotations

import os
import sys

EXIT_ERROR = 2  # a QtoolError (what the user can fix) or a usage error Typer refuses
EXIT_INTERNAL = 3  # a bug: an exception no layer turned into a QtoolError
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (128 + 2)
DEBUG_ENV = "QTOOL_DEBUG"

_debug_flag = False  # --debug, as the root command parsed it
_interrupt_reported = False  # the line for Ctrl-C is printed once, by whoever caught it first


def begin_run(debug: bool) -> None:
    """A run starts (the entry point, then the root command once it has parsed --debug): nothing reported yet."""
    global _debug_flag, _interrupt_reported
    _debug_flag = debug
    _interrupt_reported = False


def debug_enabled() -> bool:
    """--debug on the root command, or QTOOL_DEBUG=1 in the environment."""
    return _debug_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_interrupt(detail: str = "") -> None:
    """The one line for Ctrl-C on stderr (once per run, whichever layer caught it)."""
    global _interrupt_reported
    if not _interrupt_reported:
        _interrupt_reported = True
        _write_line("interrupted" + (f": {detail}" if detail else ""))


def interrupt_reported() -> bool:
    return _interrupt_reported


def internal_error_line(exc: BaseException) -> str:
    """One line naming an unexpected exception: its type and message, newlines folded."""
    message = " ".join(str(exc).split()) or "(no message)"
    return f"internal error: {type(exc).__name__}: {message}; rerun with --debug and report it"


def report_internal_error(exc: BaseException) -> None:
    _write_line(internal_error_line(exc))


def _write_line(text: str) -> None:
    # plain text, not rich: this also runs when importing the app (rich included) is what failed or was interrupted
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or gone: the exit code still tells
        pass
