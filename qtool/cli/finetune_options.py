"""The Typer options `qtool finetune asr` and `qtool finetune embeddings` share, spelled once: each command
annotates its parameter with the alias and keeps its own default."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool.cli.choices import complete_device

OutputDir = Annotated[str, typer.Option("--output", "-o", help="Directory to save the fine-tuned model to (appears only when complete).")]
PeakLr = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW; linear warm-up over the first tenth of the steps, then linear decay).")]
Device = Annotated[str, typer.Option("--device", autocompletion=complete_device, help="auto, cpu, cuda or cuda:N.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an output qtool wrote before.")]
JsonReport = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
