"""`qtool run --arena A B --prompt ...`: the prompt to each model in turn (each speed measured with the device to
itself), then one table of the replies and their speeds, or --json."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from qtool.cli.render import print_json, stderr, stdout
from qtool.core.errors import QtoolError

if TYPE_CHECKING:  # torch and transformers: imported when the command runs
    from qtool.runtime.arena import ArenaReply
    from qtool.runtime.context_files import ContextFile
    from qtool.runtime.engine import EngineConfig
    from qtool.runtime.engine_sizing import EngineSizing
    from qtool.runtime.generate import GenerationSettings


def arena_table(replies: list[ArenaReply]) -> Table:
    table = Table(title="arena", show_lines=True)
    table.add_column("model", overflow="fold")
    table.add_column("reply", overflow="fold", ratio=1)
    for column in ("tokens", "first token", "tokens/s"):
        table.add_column(column, justify="right", no_wrap=True)
    for reply in replies:
        table.add_row(reply.name, reply.text, str(reply.tokens), f"{reply.time_to_first_token:.2f} s",
                      f"{reply.tokens_per_second:.1f}")
    return table


def run_arena_command(models: list[str], prompt: str, system: str | None, raw: bool, files: list[ContextFile],
                      chat_template: Path | None, settings: GenerationSettings, device: str, dtype: str | None,
                      backend: str, engine_config: EngineConfig, sizing: EngineSizing, as_json: bool) -> None:
    from qtool.checkpoints.sources import load_model, resolve_device
    from qtool.cli.run import conversation_with_files, use_template_file
    from qtool.runtime.arena import Contender, run_arena
    from qtool.runtime.generate import has_chat_template
    from qtool.runtime.reply import ReplyGenerator

    if len(models) < 2:
        raise QtoolError(f"--arena needs at least two models, got {len(models)}", "e.g. qtool run --arena MODEL_A MODEL_B --prompt ...")
    if len(set(models)) != len(models):
        raise QtoolError(f"--arena got a model twice: {' '.join(models)}", "name each model once")
    sizing.check(resolve_device(device))
    contenders, contexts = [], {}
    for spec in models:
        loaded = load_model(spec, device=device, dtype=dtype, backend=backend, for_generation=True)
        if loaded.tokenizer is None:
            raise QtoolError(f"model '{spec}' has no tokenizer", "the model directory needs its tokenizer files")
        use_template_file(loaded.tokenizer, chat_template)
        as_raw = raw or not has_chat_template(loaded.tokenizer)
        if as_raw and not raw:
            stderr.print(f"[yellow]warning:[/] {spec}: the tokenizer has no chat template; sending the prompt as it is (--raw)")
        # each model's own conversation: templates and tokenizers (so the files' cuts) differ
        conversation, context = conversation_with_files(loaded, system, prompt, as_raw, files, settings.max_new_tokens)
        if context is not None:
            contexts[spec] = context.to_dict()
        replies = ReplyGenerator(loaded.model, loaded.tokenizer, sizing.engine_config(loaded.model, engine_config))
        contenders.append(Contender(spec, replies, conversation))
    if not as_json:
        stderr.print(f"[dim]replying one model at a time: {', '.join(models)}[/]")
    results = run_arena(contenders, settings)
    if as_json:
        print_json({"replies": [with_context(r.to_dict(), contexts.get(r.name)) for r in results]})
        return
    stdout.print(arena_table(results))


def with_context(reply: dict[str, Any], context: dict[str, Any] | None) -> dict[str, Any]:
    return reply if context is None else {**reply, "context": context}
