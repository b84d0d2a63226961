"""Everything the CLI shows: rich tables, --json output, progress bars, and domain errors turned into one red
line and an exit code. Library code returns data; only this module prints."""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qtool.cli.exits import EXIT_INTERRUPTED, debug_enabled, report_interrupt
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, Level

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

ProgressCallback = Callable[[int, int, str], None]
LEVEL_STYLES = {Level.ERROR: "bold red", Level.WARNING: "yellow", Level.INFO: "cyan"}
# --help panel of the options that say where and how a model is loaded (eval, run): a panel of its own keeps the
# long lists of choices readable at 80 columns
MODEL_LOADING = "Model loading"


def handle_errors(command: Callable) -> Callable:
    """Turn QtoolError into one red line on stderr and its exit code; --debug (QTOOL_DEBUG=1) re-raises so the
    traceback shows. Ctrl-C exits 130 with one line. Any other exception goes on to the entry point's guard."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except QtoolError as exc:
            if debug_enabled():
                raise
            stderr.print(f"[bold red]error:[/] {exc.one_line()}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            report_interrupt("nothing was written to the output")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def findings_table(findings: list[Finding], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("level", "where", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for finding in findings:
        style = LEVEL_STYLES[finding.level]
        table.add_row(f"[{style}]{finding.level.value}[/]", finding.where, finding.message, finding.fix)
    return table


def print_findings(findings: list[Finding]) -> None:
    for finding in findings:
        if finding.level is not Level.INFO:
            stderr.print(f"[{LEVEL_STYLES[finding.level]}]{finding.level.value}:[/] {finding.one_line()}")


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[ProgressCallback]:
    """A rich bar on stderr (i of N, elapsed, ETA). Yields the callback library code is given."""
    if not enabled:
        yield lambda done, total, detail="": None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=None, detail="")

        def update(done: int, total: int, detail: str = "") -> None:
            progress.update(task, completed=done, total=total, detail=detail)

        yield update
