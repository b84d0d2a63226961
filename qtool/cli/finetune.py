"""`qtool finetune MODEL --data PATH|NAME --output OUT ...`: LoRA or full fine-tuning with a live display (step,
loss, tokens/s, learning rate, ETA, peak memory), eval losses as lines, a --json summary. `finetune` is a group:
its subcommands (e.g. `qtool finetune merge`) are named first; anything else goes to the training command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer

from qtool.cli.choices import choice_enum, complete_device, plain
from qtool.cli.help_format import QtoolCommand, QtoolGroup
from qtool.cli.render import handle_errors, print_json, stderr, stdout
from qtool.config.finetune_schema import FINETUNE_METHODS, FUSED_OPS, LORA_INITS, LR_SCHEDULES

if TYPE_CHECKING:  # the library imports torch: the command imports it when it runs
    from qtool.finetune.job import FinetuneResult
    from qtool.finetune.trainer import StepReport

TRAIN_COMMAND = "train"
FinetuneMethod = choice_enum("FinetuneMethod", FINETUNE_METHODS)
LrSchedule = choice_enum("LrSchedule", LR_SCHEDULES)
LoraInit = choice_enum("LoraInit", LORA_INITS)
FusedOps = choice_enum("FusedOps", FUSED_OPS)
TRAINING = "Training"  # help panel of the schedule's flags


class DefaultCommandGroup(QtoolGroup):
    """A group whose first argument, when it names no subcommand (a model path, or an option), goes to the
    default command: `qtool finetune MODEL ...` is `qtool finetune train MODEL ...`."""

    default_command = TRAIN_COMMAND

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


finetune_app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="Fine-tune a model (LoRA or full) on your data: `qtool finetune MODEL --data FILE --output OUT`.")


class StepDisplay:
    """The rich progress line of the run, fed one StepReport per optimizer step."""

    def __init__(self, progress: Any):
        self.progress = progress
        self.task = progress.add_task("finetune", total=None, detail="")

    def __call__(self, report: StepReport) -> None:
        detail = (f"loss {report.loss:.4f}  lr {report.lr:.1e}  {report.tokens_per_second:,.0f} tok/s  "
                  f"peak {report.peak_memory_bytes / 2**30:.2f} GiB")
        self.progress.update(self.task, completed=report.step, total=report.total_steps, detail=detail)
        if report.eval_loss is not None:
            self.progress.console.print(f"step {report.step}: eval loss {report.eval_loss:.4f}")


def summary_lines(result: FinetuneResult) -> list[str]:
    train = result.train
    lines = [f"{result.method} fine-tune written to {result.output}: {train.steps} steps on {result.examples} {result.data_kind} examples "
             f"({result.rows} rows)"]
    if train.final_loss is not None:
        lines.append(f"final loss {train.final_loss:.4f}" + (f", eval loss {train.eval_loss:.4f}" if train.eval_loss is not None else ""))
    lines.append(f"{train.tokens_per_second:,.0f} tokens/s, peak memory {train.peak_memory_bytes / 2**30:.2f} GiB")
    if result.checkpoints:
        lines.append(f"checkpoints in {result.checkpoints}")
    return lines


@finetune_app.command(TRAIN_COMMAND, cls=QtoolCommand)
@handle_errors
def finetune(
    model: Annotated[str, typer.Argument(help="The base model (directory, .gguf, Hub id or alias).")],
    data: Annotated[str, typer.Option("--data", help="Training data: .txt, .jsonl/.json/.csv/.parquet (text, prompt/completion or chat messages), or a cached Hub dataset NAME[:SPLIT].")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the adapter (lora) or the model (full).")],
    method: Annotated[Optional[FinetuneMethod], typer.Option("--method", help="lora: an adapter on a float base; qlora: on a GPTQ/EXL2 base; full: every weight.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (default 16).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default 32).")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="LoRA dropout (default 0).")] = None,
    target_modules: Annotated[Optional[str], typer.Option("--target-modules", help="Comma-separated linears to adapt, or all-linear (default).")] = None,
    use_rslora: Annotated[Optional[bool], typer.Option("--rslora/--no-rslora", help="Scale LoRA by alpha/sqrt(rank).")] = None,
    use_dora: Annotated[Optional[bool], typer.Option("--dora/--no-dora", help="DoRA: weight-decomposed LoRA.")] = None,
    lora_init: Annotated[Optional[LoraInit], typer.Option("--lora-init", help="default: B = 0 (the base's own output); loftq (qlora): each adapter starts as the rank-r SVD of W_float - W_quantized, taken from --loftq-float.")] = None,
    loftq_float: Annotated[Optional[str], typer.Option("--loftq-float", help="With --lora-init loftq: the float model the quantized base was made from (directory, .gguf, alias). The adapter then holds that error: use it on this quantized base, not on the float model.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", rich_help_panel=TRAINING, help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", rich_help_panel=TRAINING, help="Stop after N optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", rich_help_panel=TRAINING, help="Peak learning rate (default 2e-4).")] = None,
    schedule: Annotated[Optional[LrSchedule], typer.Option("--schedule", rich_help_panel=TRAINING, help="Decay after warm-up (default cosine).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", rich_help_panel=TRAINING, help="Linear warm-up steps (default 0).")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", rich_help_panel=TRAINING, help="Tokens per optimizer step, padding included (default 4096).")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", rich_help_panel=TRAINING, help="Longest sequence in tokens (default 512).")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", rich_help_panel=TRAINING, help="Pack short examples into seqlen rows (default on; each example sees only itself).")] = None,
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing", rich_help_panel=TRAINING, help="Recompute activations in the backward: less memory, ~30% slower.")] = None,
    fused_ops: Annotated[Optional[FusedOps], typer.Option("--fused-ops", rich_help_panel=TRAINING, help="The training forward: auto (default) is qtool's fused kernels on CUDA where the model's layers allow (Llama, Mistral, Qwen2/3, Gemma, Granite), transformers' elsewhere; on: fused on the CPU too (torch references); off: transformers'.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", rich_help_panel=TRAINING, help="Seed of the data order and the adapter's init (default 0).")] = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data (same kinds as --data) for the eval loss.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Steps between eval losses (default: at the end only).")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Steps between checkpoints in OUTPUT-checkpoints/ (default: none).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUTPUT-checkpoints/.")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="A YAML/JSON/TOML file of settings (its `finetune:` section, or the whole file); flags override it.")] = None,
    device: Annotated[str, typer.Option("--device", autocompletion=complete_device, help="auto, cpu, cuda or cuda:N.")] = "auto",
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes of one torch.distributed group on this host (gloo on the CPU, one GPU each with NCCL), the global batch split between them.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (and an earlier run's checkpoints).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only a JSON summary (steps, losses, tokens/s, peak memory, output).")] = False,
) -> None:
    """Fine-tune MODEL on --data and write an adapter (lora) or a model (full) to --output."""
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from qtool.config.finetune_schema import resolve_finetune_config
    from qtool.cli.render import print_findings
    from qtool.finetune.distributed import check_nproc, run_distributed
    from qtool.finetune.job import FinetuneJob, run_finetune

    overrides = {"method": plain(method), "rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": target_modules,
                 "use_rslora": use_rslora, "use_dora": use_dora, "lora_init": plain(lora_init), "loftq_float": loftq_float,
                 "epochs": epochs, "max_steps": max_steps, "lr": lr,
                 "schedule": plain(schedule), "warmup_steps": warmup_steps, "batch_tokens": batch_tokens, "seqlen": seqlen,
                 "packing": packing, "grad_checkpointing": grad_checkpointing, "fused_ops": plain(fused_ops), "seed": seed, "eval_every": eval_every,
                 "save_every": save_every}
    settings, findings = resolve_finetune_config(config, overrides)
    if not as_json:
        print_findings(findings)
    job = FinetuneJob(model=model, data=data, output=output, config=settings, eval_data=eval_data, resume=resume, force=force, device=device)
    check_nproc(nproc, device)

    def start(progress: Any = None) -> FinetuneResult:
        return run_finetune(job, progress=progress) if nproc == 1 else run_distributed(job, nproc, progress=progress)

    if as_json:
        print_json(start().to_dict())
        return
    # no bar: step/total and the ETA say as much, and the line keeps within 80 columns
    columns = (TextColumn("[bold]{task.description}"), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=False) as progress:
        result = start(StepDisplay(progress))
    for note in result.notes:
        stderr.print(f"[dim]note: {note}[/]")
    for line in summary_lines(result):
        stdout.print(line)
