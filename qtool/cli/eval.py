"""`qtool eval MODEL --perplexity wikitext|PATH` and `qtool eval --compare A B ... --perplexity ...`: perplexity
by the standard protocol, as a table or JSON; progress on stderr."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError
from qtool.kernels.registry import BACKEND_HELP, check_backend_name
from qtool.eval.compare import CompareResult, compare_models, human_size
from qtool.data.text import load_eval_text
from qtool.eval.perplexity import PerplexityResult, perplexity
from qtool.checkpoints.sources import DTYPES, load_model, resolve_device


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise QtoolError(f"--dtype {dtype} is not valid", "use " + ", ".join(DTYPES))


def single_table(model: str, result: PerplexityResult) -> Table:
    table = Table(title=f"perplexity of {model}")
    for column in ("ppl", "windows", "seqlen", "tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.ppl:.3f}", str(result.windows), str(result.seqlen), str(result.tokens), f"{result.seconds:.1f}", f"{result.tokens_per_second:.0f}")
    return table


def compare_table(result: CompareResult) -> Table:
    table = Table(title=f"perplexity over {result.windows} windows of {result.seqlen} tokens")
    table.add_column("model", overflow="fold")
    table.add_column("format")
    for column in ("ppl", "size", "bits/weight", "tokens/s"):
        table.add_column(column, justify="right")
    for report in result.models:
        bits = f"{report.bits_per_weight:.2f}" if report.bits_per_weight is not None else "?"
        table.add_row(report.model, report.format, f"{report.ppl:.3f}", human_size(report.size_bytes), bits, f"{report.tokens_per_second:.0f}")
    return table


@handle_errors
def eval_model(
    models: Optional[list[str]] = typer.Argument(None, metavar="MODEL", help="The model to evaluate (directory, .gguf, Hub id or alias); several with --compare."),
    compare: bool = typer.Option(False, "--compare", help="Evaluate every MODEL on the same windows and recommend one."),
    text_source: str = typer.Option(..., "--perplexity", help="`wikitext` (wikitext-2-raw-v1 test split, needs the Hub or its cache) or a text file."),
    windows: Optional[int] = typer.Option(None, "--windows", help="Use only the first N windows (default: all)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per window (default 2048, or the model's context if shorter)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print only the result as JSON."),
) -> None:
    """Measure perplexity: exp(mean NLL) over non-overlapping windows of the tokenized text."""
    models = models or []
    if not models:
        raise QtoolError("no model given", "qtool eval MODEL --perplexity wikitext|PATH, or --compare A B ...")
    if len(models) > 1 and not compare:
        raise QtoolError(f"{len(models)} models given without --compare", "add --compare to evaluate them side by side")
    check_dtype(dtype)
    check_backend_name(backend)
    if compare and backend != "auto":
        raise QtoolError("--backend cannot be combined with --compare yet", "compare with the default --backend auto, or evaluate each model on its own")
    resolve_device(device)  # a bad --device fails before minutes of loading
    text = load_eval_text(text_source)
    if compare:
        with progress_bar("perplexity", enabled=not as_json) as update:
            result = compare_models(models, text, seqlen=seqlen, windows=windows, device=device, dtype=dtype, progress=update)
        if as_json:
            print_json(result.to_dict())
            return
        stdout.print(compare_table(result))
        stdout.print(f"recommended: {result.recommendation}")
        for note in result.notes:
            stderr.print(f"[dim]note: {note}[/]")
        return
    loaded = load_model(models[0], device=device, dtype=dtype, backend=backend)
    if loaded.tokenizer is None:
        raise QtoolError(f"model '{models[0]}' has no tokenizer", "the model directory needs its tokenizer files to tokenize the text")
    with progress_bar("perplexity", enabled=not as_json) as update:
        result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=seqlen, windows=windows, progress=update)
    if as_json:
        print_json({"model": models[0], **result.to_dict()})
        return
    stdout.print(single_table(models[0], result))
