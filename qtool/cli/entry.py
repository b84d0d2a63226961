"""The console script `qtool`: runs the Typer app inside the last-resort guard, so that no traceback reaches a
user without --debug. Ctrl-C is handled before the app (torch-free, but Typer and rich) is even imported."""

from __future__ import annotations

import signal
import sys
from typing import Sequence

# Only the standard library and exits.py (itself standard library only) above this line: a Ctrl-C or a broken
# install while the app imports must meet the guard below, not an uncaught exception.
from qtool.cli.exits import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    begin_run,
    debug_enabled,
    interrupt_reported,
    report_internal_error,
    report_interrupt,
)

ROOT_DEBUG_FLAG = "--debug"


def main(argv: Sequence[str] | None = None) -> None:
    """Run `qtool ARGS` (argv, default sys.argv[1:]) and exit: 0 or the command's code, 2 for a QtoolError or a
    usage error, 3 for a bug (one line; the traceback with --debug), 130 for Ctrl-C (one line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is parsed by the app, which may fail to import: read it from the root options as well
    begin_run(debug=_root_flag(args, ROOT_DEBUG_FLAG))
    try:
        from qtool.cli.main import app

        app(args=args, prog_name="qtool")  # standalone: always ends in SystemExit
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exit_:
        if exit_.code == EXIT_INTERRUPTED and not interrupt_reported():
            _exit_interrupted()  # Typer turned a Ctrl-C outside any command (while parsing) into a silent 130
        raise
    except Exception as exc:
        if debug_enabled():
            raise
        report_internal_error(exc)
        sys.exit(EXIT_INTERNAL)


def _exit_interrupted() -> None:
    # a second Ctrl-C while exiting (threads joining, files closing) ends the process at once, by the signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    report_interrupt()
    sys.exit(EXIT_INTERRUPTED)


def _root_flag(args: list[str], flag: str) -> bool:
    """Whether `flag` is among the root options, i.e. before the command name (the first argument that is not an
    option; the root options take no values)."""
    for arg in args:
        if not arg.startswith("-"):
            return False
        if arg == flag:
            return True
    return False


if __name__ == "__main__":
    main()
