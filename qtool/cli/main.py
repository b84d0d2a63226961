"""The qtool command line: one Typer app; each command lives in its own module and calls one library function."""

from __future__ import annotations

import logging
from importlib.metadata import version as package_version
from typing import Annotated

import typer

from qtool.cli import convert as convert_command
from qtool.cli import eval as eval_command
from qtool.cli import quantize as quantize_command
from qtool.cli import run as run_command
from qtool.cli import validate as validate_command

app = typer.Typer(
    name="qtool",
    help="Quantize, convert, validate, evaluate and run large language models.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion: the shell completes commands, flags and choices
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qtool {package_version('qtool')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what qtool decides (INFO level).")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # qtool draws its own progress bars; transformers' per-tensor loading bars would interleave with them.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


app.command("quantize")(quantize_command.quantize)
app.command("convert")(convert_command.convert)
app.command("validate")(validate_command.validate)
app.command("eval")(eval_command.eval_model)
app.command("run")(run_command.run)
