"""`qtool eval MODEL --perplexity wikitext|PATH` and `qtool eval --compare A B ... --perplexity ...`: perplexity
by the standard protocol, as a table or JSON; progress on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from qtool.cli.choices import Backend, KvCache, ModelDtype, complete_device, plain
from qtool.cli.render import MODEL_LOADING
from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError
from qtool.kernels.backend_names import BACKEND_HELP
from qtool.runtime.kv_cache_names import default_block_size

if TYPE_CHECKING:  # these import torch: the command imports them when it runs
    from qtool.eval.compare import CompareResult
    from qtool.eval.perplexity import PerplexityResult, WindowLogits



def single_table(model: str, result: PerplexityResult) -> Table:
    table = Table(title=f"perplexity of {model}")
    for column in ("ppl", "windows", "seqlen", "tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.ppl:.3f}", str(result.windows), str(result.seqlen), str(result.tokens), f"{result.seconds:.1f}", f"{result.tokens_per_second:.0f}")
    return table


def compare_table(result: CompareResult) -> Table:
    from qtool.eval.compare import human_size

    table = Table(title=f"perplexity over {result.windows} windows of {result.seqlen} tokens")
    table.add_column("model", overflow="fold")
    table.add_column("format")
    for column in ("ppl", "size", "bits/weight", "tokens/s"):
        table.add_column(column, justify="right")
    for report in result.models:
        bits = f"{report.bits_per_weight:.2f}" if report.bits_per_weight is not None else "?"
        table.add_row(report.model, report.format, f"{report.ppl:.3f}", human_size(report.size_bytes), bits, f"{report.tokens_per_second:.0f}")
    return table


def engine_window_logits(model: object, seqlen: int, kv_cache: str) -> WindowLogits:
    """--engine: each window's logits from the engine's model runner (its attention, its paged KV cache of kind
    kv_cache), which eval itself cannot import; the runner's cache holds one window."""
    from qtool.runtime.engine import engine_support
    from qtool.runtime.engine.model_runner import ModelRunner

    reason = engine_support(model)
    if reason is not None:
        raise QtoolError(f"--engine: {reason}", "drop --engine to evaluate it through the model's own forward")
    # prefills only: no decode step to plan
    block_size = default_block_size(kv_cache)  # the engine's own block size for the kind
    runner = ModelRunner(model, num_blocks=-(-seqlen // block_size), block_size=block_size, kv_cache=kv_cache,
                         fast_decode=False)
    return runner.prompt_logits


@handle_errors
def eval_model(
    models: Annotated[Optional[list[str]], typer.Argument(metavar="MODEL", help="The model to evaluate (directory, .gguf, Hub id or alias); several with --compare.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Evaluate every MODEL on the same windows and recommend one.")] = False,
    text_source: Annotated[str, typer.Option("--perplexity", help="`wikitext` (wikitext-2-raw-v1 test split, needs the Hub or its cache) or a text file.")] = ...,
    windows: Annotated[Optional[int], typer.Option("--windows", min=1, help="Use only the first N windows (default: all).")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", min=1, help="Tokens per window (default 2048, or the model's context if shorter).")] = None,
    device: Annotated[str, typer.Option("--device", rich_help_panel=MODEL_LOADING, autocompletion=complete_device, help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Optional[ModelDtype], typer.Option("--dtype", rich_help_panel=MODEL_LOADING, help="Dtype to load the model in (default: float32 on CPU, bfloat16 on CUDA).")] = None,
    backend: Annotated[Backend, typer.Option("--backend", rich_help_panel=MODEL_LOADING, help=BACKEND_HELP)] = Backend("auto"),
    adapter: Annotated[Optional[Path], typer.Option("--adapter", rich_help_panel=MODEL_LOADING, help="A LoRA adapter directory (qtool finetune's output): merged into a float base, run beside a GPTQ/EXL2 base's packed weights.")] = None,
    engine: Annotated[bool, typer.Option("--engine", help="Compute the logits through qtool's engine (its attention and paged KV cache) instead of the model's own forward.")] = False,
    kv_cache: Annotated[Optional[KvCache], typer.Option("--kv-cache", help="With --engine: the KV cache's storage, auto (the model's dtype), fp16, bf16, or quantized q8 / q4.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result as JSON.")] = False,
) -> None:
    """Measure perplexity: exp(mean NLL) over non-overlapping windows of the tokenized text."""
    models = models or []
    if not models:
        raise QtoolError("no model given", "qtool eval MODEL --perplexity wikitext|PATH, or --compare A B ...")
    if len(models) > 1 and not compare:
        raise QtoolError(f"{len(models)} models given without --compare", "add --compare to evaluate them side by side")
    dtype, backend, kv_cache = plain(dtype), plain(backend), plain(kv_cache)
    if compare and backend != "auto":
        raise QtoolError("--backend cannot be combined with --compare yet", "compare with the default --backend auto, or evaluate each model on its own")
    if kv_cache is not None and not engine:
        raise QtoolError("--kv-cache goes with --engine", "add --engine, or drop --kv-cache")
    if compare and adapter is not None:
        raise QtoolError("--adapter cannot be combined with --compare yet", "evaluate the adapted model on its own")
    if compare and engine:
        raise QtoolError("--engine cannot be combined with --compare yet", "evaluate each model on its own with --engine")
    from qtool.checkpoints.sources import load_model, resolve_device
    from qtool.data.text import load_eval_text
    from qtool.eval.compare import compare_models
    from qtool.eval.perplexity import choose_seqlen, perplexity

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
    if adapter is not None:
        from qtool.cli.adapter_option import with_adapter

        with_adapter(loaded, adapter)
    window_logits = None
    if engine:
        seqlen = choose_seqlen(loaded.model, seqlen)
        window_logits = engine_window_logits(loaded.model, seqlen, kv_cache or "auto")
    with progress_bar("perplexity", enabled=not as_json) as update:
        result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=seqlen, windows=windows, progress=update, name=models[0],
                            window_logits=window_logits)
    through = {"engine": True, "kv_cache": kv_cache or "auto"} if engine else {}
    if as_json:
        print_json({"model": models[0], **result.to_dict(), **through})
        return
    stdout.print(single_table(models[0] + (f" (engine, kv cache {through['kv_cache']})" if engine else ""), result))
