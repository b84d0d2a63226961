"""`qtool run MODEL`: chat with a model through qtool's engine (transformers' generate for a family it cannot take).
One reply for --prompt (or a prompt piped on stdin), streamed to stdout; an interactive multi-turn chat when stdin
is a terminal and no prompt is given; `--batch FILE --output OUT` runs a JSONL file of requests as one batch;
`--file` puts files in front of the prompt; `--arena A B` sends the prompt to each model and prints one table."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from qtool.cli.adapter_option import with_adapter
from qtool.cli.choices import Backend, KvCache, ModelDtype, Speculate, complete_device, plain
from qtool.cli.render import MODEL_LOADING
from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError
from qtool.kernels.backend_names import BACKEND_HELP

if TYPE_CHECKING:  # the runtime imports torch and transformers: the command imports it when it runs
    from qtool.runtime.context_files import ContextFile, ContextFit
    from qtool.runtime.engine import EngineConfig
    from qtool.runtime.engine_sizing import EngineSizing
    from qtool.runtime.generate import GenerationResult, GenerationSettings, Message
    from qtool.runtime.reply import ReplyGenerator

EXIT_WORDS = {"/exit", "/quit"}
ENGINE = "Engine"  # the help panel of the engine's sizes


def stream_to_stdout(text: str) -> None:
    stdout.out(text, end="", highlight=False)


def report_speed(result: GenerationResult) -> None:
    stderr.print(f"[dim]{result.tokens} tokens in {result.seconds:.2f} s, first after {result.time_to_first_token:.2f} s, "
                 f"{result.tokens_per_second:.1f} tokens/s[/]")


def start_history(system: str | None, raw: bool) -> str | list[Message]:
    """An empty conversation: raw mode is one growing text (a system text first), chat mode a message list."""
    if raw:
        return f"{system}\n\n" if system else ""
    return [{"role": "system", "content": system}] if system else []


def with_user_turn(history: str | list[Message], text: str) -> str | list[Message]:
    return history + text if isinstance(history, str) else history + [{"role": "user", "content": text}]


def with_reply(conversation: str | list[Message], reply: str) -> str | list[Message]:
    return conversation + reply if isinstance(conversation, str) else conversation + [{"role": "assistant", "content": reply}]


def chat_loop(replies: ReplyGenerator, settings: GenerationSettings, system: str | None, raw: bool, read_line: Callable[[], str | None]) -> int:
    """Multi-turn chat: each reply joins the history the next turn is generated from (one ReplyGenerator for all
    turns, so the engine's prefix cache skips the turns already seen). `read_line` returns the next user input,
    None at end of input; /exit or /quit stop, /reset clears the history. Returns the turns."""
    history = start_history(system, raw)
    turns = 0
    while True:
        line = read_line()
        if line is None or line.strip() in EXIT_WORDS:
            return turns
        if line.strip() == "/reset":
            history = start_history(system, raw)
            stderr.print("[dim]history cleared[/]")
            continue
        if not line.strip():
            continue
        conversation = with_user_turn(history, line)
        result = replies.reply(conversation, settings, on_text=stream_to_stdout)
        stdout.out("")
        report_speed(result)
        history = with_reply(conversation, result.text)
        turns += 1


def speculative_config(base: EngineConfig, speculate: str | None, draft: str | None,
                       temperature: float) -> EngineConfig:
    """The engine settings for --speculate / --draft (a draft model implies --speculate draft)."""
    import dataclasses

    if draft is not None and speculate not in (None, "draft"):
        raise QtoolError(f"--draft goes with --speculate draft, not --speculate {speculate}", "drop one of them")
    if speculate == "draft" and draft is None:
        raise QtoolError("--speculate draft needs --draft MODEL", "pass --draft MODEL, or --speculate ngram")
    method = "draft" if draft is not None else speculate
    if method is None:
        return base
    if temperature > 0:
        stderr.print("[yellow]warning:[/] speculative decoding speeds up greedy replies only (--temperature 0); "
                     "sampled replies decode plainly")
    return dataclasses.replace(base, speculative=method)


def report_speculation(replies: ReplyGenerator) -> None:
    stats = replies.stats()
    for drafter, counts in (stats.speculation if stats is not None else {}).items():
        stderr.print(f"[dim]speculative decoding ({drafter}): {counts['accepted']} of {counts['drafted']} drafted "
                     f"tokens accepted ({100 * counts['acceptance_rate']:.0f}%)[/]")


def read_terminal_line() -> str | None:
    try:
        return stderr.input("[bold cyan]you>[/] ")
    except EOFError:
        return None


@handle_errors
def run(
    model: Annotated[list[str], typer.Argument(help="The model (directory, .gguf, Hub id or alias); with --arena, two or more.", show_default=False)],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One prompt; without it: a chat on a terminal, else the prompt is read from stdin.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message (chat mode) or a preamble (--raw).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate per reply.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy decoding.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass; 1 switches it off.")] = 0.9,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the K likeliest tokens; 0 switches it off.")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling, for repeatable replies.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as it is, without the chat template.")] = False,
    batch: Annotated[Optional[Path], typer.Option("--batch", help="A JSONL file of requests ({id, prompt or messages, sampling fields}), run as one batch; needs --output.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --batch: the JSONL file of replies ({id, text, tokens, timings}, in input order).")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --batch: replace an existing --output.")] = False,
    device: Annotated[str, typer.Option("--device", rich_help_panel=MODEL_LOADING, autocompletion=complete_device, help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Optional[ModelDtype], typer.Option("--dtype", rich_help_panel=MODEL_LOADING, help="Dtype to load the model in (default: float32 on CPU, bfloat16 on CUDA).")] = None,
    backend: Annotated[Backend, typer.Option("--backend", rich_help_panel=MODEL_LOADING, help=BACKEND_HELP)] = Backend("auto"),
    adapter: Annotated[Optional[Path], typer.Option("--adapter", rich_help_panel=MODEL_LOADING, help="A LoRA adapter directory (qtool finetune's output): merged into a float base, run beside a GPTQ/EXL2 base's packed weights.")] = None,
    kv_cache: Annotated[KvCache, typer.Option("--kv-cache", help="The engine's KV cache: auto (the model's dtype), fp16, bf16, or quantized q8 / q4 (about 2x / 3.5x the tokens in the same memory; q4 also holds each running sequence's current 64-token block exact).")] = KvCache("auto"),
    speculate: Annotated[Optional[Speculate], typer.Option("--speculate", help="Speculative decoding of greedy replies: ngram drafts by looking the last tokens up in the prompt and reply so far; draft needs --draft.")] = None,
    draft: Annotated[Optional[str], typer.Option("--draft", help="A smaller draft model with the same tokenizer (directory, .gguf, Hub id or alias) proposing tokens the model verifies, for greedy replies; implies --speculate draft.")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, rich_help_panel=ENGINE, help="Most requests the engine decodes at once (with --batch).")] = None,
    cache_blocks: Annotated[Optional[int], typer.Option("--cache-blocks", min=1, rich_help_panel=ENGINE, help="KV cache size in blocks of 16 tokens (64 with --kv-cache q4; default: the batch's full contexts, at most 2 GiB).")] = None,
    gpu_memory_fraction: Annotated[Optional[float], typer.Option("--gpu-memory-fraction", rich_help_panel=ENGINE, help="Size the KV cache to what is left of this fraction of the GPU's memory once the model is loaded, 0 < F <= 1.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, tokens, seconds, tokens_per_second, ...} instead of streaming (with --batch: the totals).")] = False,
    file: Annotated[Optional[list[Path]], typer.Option("--file", help="A text or code file put in front of the prompt as a labelled block (repeat for several); what does not fit the context is cut from the file tails, said on stderr.")] = None,
    arena: Annotated[bool, typer.Option("--arena", help="Send the prompt to every MODEL in turn (qtool run --arena A B --prompt ...) and print one table of the replies and their speeds.")] = False,
    chat_template: Annotated[Optional[Path], typer.Option("--chat-template", help="A jinja2 chat template file used instead of the tokenizer's (checked by rendering a sample conversation first).")] = None,
) -> None:
    """Generate text from a prompt, chat, or run a batch of requests."""
    from qtool.checkpoints.sources import load_model, resolve_device
    from qtool.runtime.engine import EngineConfig
    from qtool.runtime.generate import GenerationSettings, has_chat_template
    from qtool.runtime.engine_sizing import EngineSizing, engine_report
    from qtool.runtime.reply import CHAT_ENGINE_CONFIG, ReplyGenerator

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    settings.check()
    files = read_files(file or [])
    if chat_template is not None and raw:
        raise QtoolError("--chat-template and --raw exclude each other", "--raw sends the prompt without any template")
    if arena:
        from qtool.cli.run_arena import run_arena_command

        if batch is not None or draft is not None or speculate is not None:
            raise QtoolError("--arena compares plain replies", "drop --batch, --draft and --speculate")
        prompt = prompt if prompt is not None else read_piped_prompt(interactive=sys.stdin.isatty())
        run_arena_command(model, prompt, system, raw, files, chat_template, settings, device, plain(dtype),
                          plain(backend), replace(CHAT_ENGINE_CONFIG, kv_cache=plain(kv_cache), block_size=None),
                          EngineSizing(max_batch, cache_blocks, gpu_memory_fraction), as_json)
        return
    if len(model) != 1:
        raise QtoolError(f"qtool run takes one MODEL, got {len(model)}: {' '.join(model)}", "pass --arena to compare several")
    model = model[0]
    dtype, backend, speculate, kv_cache = plain(dtype), plain(backend), plain(speculate), plain(kv_cache)
    sizing = EngineSizing(max_batch, cache_blocks, gpu_memory_fraction)
    sizing.check(resolve_device(device))
    if batch is not None:
        engine_config = speculative_config(EngineConfig(kv_cache=kv_cache), speculate, draft, temperature)
        run_batch_file(model, batch, output, force, settings, device, dtype, backend, as_json, engine_config, draft,
                       sizing, adapter)
        return
    engine_config = speculative_config(replace(CHAT_ENGINE_CONFIG, kv_cache=kv_cache, block_size=None), speculate,
                                       draft, temperature)
    if output is not None:
        raise QtoolError("--output goes with --batch", "pass --batch FILE, or drop --output")
    interactive = prompt is None and sys.stdin.isatty()
    if interactive and as_json:
        raise QtoolError("--json needs a prompt", "pass --prompt TEXT or pipe the prompt on stdin")
    if interactive and files:
        raise QtoolError("--file needs a prompt", "pass --prompt TEXT or pipe the prompt on stdin")
    if prompt is None and not interactive:
        prompt = read_piped_prompt(interactive)
    loaded = with_adapter(load_model(model, device=device, dtype=dtype, backend=backend, for_generation=True), adapter)
    if loaded.tokenizer is None:
        raise QtoolError(f"model '{model}' has no tokenizer", "the model directory needs its tokenizer files")
    use_template_file(loaded.tokenizer, chat_template)
    if not raw and not has_chat_template(loaded.tokenizer):
        stderr.print("[yellow]warning:[/] the tokenizer has no chat template; sending the prompt as it is (--raw)")
        raw = True
    drafter = load_model(draft, device=device, dtype=dtype, backend=backend, for_generation=True) if draft is not None else None
    replies = ReplyGenerator(loaded.model, loaded.tokenizer, sizing.engine_config(loaded.model, engine_config),
                             getattr(drafter, "model", None), getattr(drafter, "tokenizer", None))
    if interactive:
        stderr.print("[dim]chat: /reset clears the history, /exit or Ctrl-D quits[/]")
        chat_loop(replies, settings, system, raw, read_terminal_line)
        return
    conversation, context = conversation_with_files(loaded, system, prompt, raw, files, max_new_tokens)
    if as_json:
        reply = replies.reply(conversation, settings).to_dict()
        extra = {"context": context.to_dict()} if context is not None else {}
        print_json({**reply, **extra, "engine": engine_report(replies.engine_config, replies.engine and replies.engine.num_blocks, sizing)})
        return
    result = replies.reply(conversation, settings, on_text=stream_to_stdout)
    stdout.out("")
    report_speed(result)
    report_speculation(replies)


def read_piped_prompt(interactive: bool) -> str:
    """The prompt piped on stdin (a terminal gives none)."""
    prompt = "" if interactive else sys.stdin.read().rstrip("\n")
    if not prompt.strip():
        raise QtoolError("no prompt: --prompt was not given and stdin is empty", "pass --prompt TEXT or pipe the prompt on stdin")
    return prompt


def read_files(paths: list[Path]) -> list[ContextFile]:
    """--file: each file read before any model loads, so a bad one fails at once."""
    from qtool.runtime.context_files import read_context_file

    return [read_context_file(path) for path in paths]


def use_template_file(tokenizer: Any, chat_template: Path | None) -> None:
    """--chat-template: the file's template replaces the tokenizer's for this run."""
    if chat_template is not None:
        from qtool.runtime.chat_template_source import read_template_file

        tokenizer.chat_template = read_template_file(chat_template, tokenizer)


def conversation_with_files(loaded: Any, system: str | None, prompt: str, raw: bool, files: list[ContextFile],
                            max_new_tokens: int) -> tuple[str | list[Message], ContextFit | None]:
    """The first turn's conversation; with --file, the files in front of the prompt, cut to fit the model's context
    with room for the reply (each cut said on stderr)."""
    conversation = with_user_turn(start_history(system, raw), prompt)
    if not files:
        return conversation, None
    from qtool.runtime.context_files import fit_context, model_context_length, raw_text

    messages = [{"role": "system", "content": system}] if system else []
    fit = fit_context(loaded.tokenizer, messages + [{"role": "user", "content": prompt}], files,
                      model_context_length(loaded.model), max_new_tokens, raw=raw)
    for cut in fit.cuts:
        stderr.print(f"[yellow]context:[/] {cut} (the prompt is {fit.prompt_tokens} tokens, the context {fit.context_length})")
    return (raw_text(fit.messages) if raw else fit.messages), fit


def run_batch_file(model: str, batch: Path, output: Path | None, force: bool, settings: GenerationSettings,
                   device: str, dtype: str | None, backend: str, as_json: bool, engine_config: EngineConfig,
                   draft: str | None, sizing: EngineSizing, adapter: Path | None = None) -> None:
    """--batch: every request of the file through one engine; the run's flags are each request's defaults."""
    from qtool.checkpoints.sources import load_model
    from qtool.runtime.batch import run_batch, write_batch_outputs
    from qtool.runtime.batch_file import read_batch_requests
    from qtool.runtime.engine_sizing import engine_report

    if output is None:
        raise QtoolError("--batch needs --output", "e.g. --output replies.jsonl")
    if output.exists() and not force:
        raise QtoolError(f"output {output} already exists", "pass --force to replace it, or choose another --output")
    requests = read_batch_requests(batch)  # before the model loads: a bad file fails at once
    loaded = with_adapter(load_model(model, device=device, dtype=dtype, backend=backend, for_generation=True), adapter)
    if loaded.tokenizer is None:
        raise QtoolError(f"model '{model}' has no tokenizer", "the model directory needs its tokenizer files")
    drafter = load_model(draft, device=device, dtype=dtype, backend=backend, for_generation=True) if draft is not None else None
    config = sizing.engine_config(loaded.model, engine_config)
    with progress_bar("batch", enabled=not as_json) as update:
        result = run_batch(loaded.model, loaded.tokenizer, requests, settings, progress=update,
                           engine_config=config, draft_model=getattr(drafter, "model", None),
                           draft_tokenizer=getattr(drafter, "tokenizer", None))
    write_batch_outputs(output, result, force=force)
    totals = result.totals
    if as_json:
        print_json({**totals.to_dict(), "engine": engine_report(config, totals.cache_blocks, sizing)})
        return
    stderr.print(f"{totals.requests} replies written to {output}: {totals.output_tokens} tokens in {totals.seconds:.2f} s, "
                 f"{totals.tokens_per_second:.1f} tokens/s")
