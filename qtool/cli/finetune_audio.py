"""`qtool finetune` for speech: fine-tune a Whisper-architecture model on a speech JSONL file ({"audio": wav,
"text": transcript} rows) and report loss and word error rate before and after. A command function the finetune
command routes to when its data are audio; it is not registered on its own."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from qtool.cli.finetune_options import Device, Force, JsonReport, OutputDir, PeakLr
from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout

if TYPE_CHECKING:  # imports torch: the command imports it when it runs
    from qtool.finetune.audio.asr_trainer import AsrReport


def report_table(report: AsrReport) -> Table:
    table = Table(title=f"speech recognition on the {report.eval_on} ({report.eval_examples} clips)")
    for column in ("", "before", "after"):
        table.add_column(column)
    table.add_row("word error rate", f"{report.wer_before:.1%}", f"{report.wer_after:.1%}")
    table.add_row("token loss", f"{report.loss_before:.3f}", f"{report.loss_after:.3f}")
    return table


@handle_errors
def finetune_audio(
    model: Annotated[str, typer.Argument(help="The Whisper model directory (weights, config, tokenizer).")],
    data: Annotated[Path, typer.Option("--data", help='Speech JSONL: one {"audio": "clip.wav", "text": "transcript"} per line; paths relative to the file.')],
    output: OutputDir,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 200,
    lr: PeakLr = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step.")] = 8,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="Speech JSONL to measure loss and WER on (default: the training data).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffling and of any randomness in training.")] = 0,
    language: Annotated[str, typer.Option("--language", help="Language token for multilingual Whisper models (ignored by English-only ones).")] = "en",
    freeze_encoder: Annotated[bool, typer.Option("--freeze-encoder", help="Train the decoder only, on encoder outputs computed once (pretrained models, little data; much faster).")] = False,
    device: Device = "auto",
    force: Force = False,
    as_json: JsonReport = False,
) -> None:
    """Fine-tune a speech recognizer (Whisper architecture) and report WER before and after."""
    from qtool.finetune.audio.asr_trainer import train_asr

    with progress_bar("fine-tuning", enabled=not as_json) as update:
        report = train_asr(model, data, output, max_steps=max_steps, lr=lr, batch_size=batch_size, eval_data=eval_data,
                           seed=seed, progress=update, device=device, language=language,
                           freeze_encoder=freeze_encoder, force=force)
    if as_json:
        print_json(report.to_dict())
        return
    stdout.print(report_table(report))
    stderr.print(f"{report.steps} steps ({report.trained}) on {report.train_examples} clips in {report.seconds:.1f} s on {report.device}; "
                 f"train loss {report.train_loss_first:.3f} -> {report.train_loss_last:.3f}; saved to {report.output}")
