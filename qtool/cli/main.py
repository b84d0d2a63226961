"""The qtool command line: one Typer app; each command lives in its own module and calls one library function.
Built without torch or transformers: each command imports the library when it runs (`qtool --help` is instant)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from qtool.cli import convert as convert_command
from qtool.cli import eval as eval_command
from qtool.cli import finetune_audio as finetune_audio_command
from qtool.cli import finetune_embeddings as finetune_embeddings_command
from qtool.cli import finetune_merge as finetune_merge_command
from qtool.cli import finetune as finetune_command
from qtool.cli import quantize as quantize_command
from qtool.cli import run as run_command
from qtool.cli import serve as serve_command
from qtool.cli import tune as tune_command
from qtool.cli import validate as validate_command
from qtool.cli.exits import begin_run
from qtool.cli.help_format import QtoolCommand, QtoolGroup

app = typer.Typer(
    name="qtool",
    cls=QtoolGroup,
    help="Quantize, convert, validate, evaluate and run large language models.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion: the shell completes commands, flags and choices
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version as package_version  # ~50 ms of imports (email, zipfile) only --version needs

        typer.echo(f"qtool {package_version('qtool')}")
        raise typer.Exit()


def quiet_transformers_progress() -> None:
    """qtool draws its own progress bars; transformers' per-tensor loading bars would interleave with them."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    else:
        # not imported yet (and not imported here, for start-up time): both transformers and huggingface_hub read
        # this when they are; a value the user set wins
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what qtool decides (INFO level).")] = False,
) -> None:
    begin_run(debug)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_transformers_progress()


app.command("quantize", cls=QtoolCommand)(quantize_command.quantize)
app.command("convert", cls=QtoolCommand)(convert_command.convert)
app.command("validate", cls=QtoolCommand)(validate_command.validate)
app.command("eval", cls=QtoolCommand)(eval_command.eval_model)
app.command("run", cls=QtoolCommand)(run_command.run)
app.command("tune", cls=QtoolCommand)(tune_command.tune)
app.command("serve", cls=QtoolCommand)(serve_command.serve)
# `qtool finetune MODEL ...` trains a causal LM; its other jobs are subcommands of the same group
finetune_command.finetune_app.command("merge", cls=QtoolCommand, help="Merge a LoRA adapter into its base and quantize it again (--requantize gptq|exl2).")(finetune_merge_command.merge)
finetune_command.finetune_app.command("embeddings", cls=QtoolCommand, help="Contrastive fine-tuning of a sentence-embedding model on pairs/triplets (recall@k and MRR before/after).")(finetune_embeddings_command.finetune_embeddings)
finetune_command.finetune_app.command("asr", cls=QtoolCommand, help="Fine-tune a Whisper speech-recognition model on audio + transcript rows (WER before/after).")(finetune_audio_command.finetune_audio)
app.add_typer(finetune_command.finetune_app, name="finetune")
