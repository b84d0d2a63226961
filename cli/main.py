"""The qtool command line: one Typer app; each command lives in its own module and calls one library function."""

from __future__ import annotations

import logging
from importlib.metadata import version as package_version

import typer

from qtool.cli import validate as validate_command

app = typer.Typer(
    name="qtool",
    help="Quantize, convert, validate, evaluate and run large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qtool {package_version('qtool')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what qtool decides (INFO level)."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


app.command("validate")(validate_command.validate)
