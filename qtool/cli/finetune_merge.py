"""`qtool finetune merge BASE ADAPTER OUT [--requantize gptq|exl2]`: fold a LoRA adapter into the base's float
weights and write the merged model, as float or quantized again (by default with the base's own quantization
config); prints what the round trip cost against the merged float model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from qtool.cli.choices import GptqBits, choice_enum, complete_device, plain
from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout
from qtool.formats.registry import QUANT_FORMATS

if TYPE_CHECKING:  # the merge imports torch and peft: the command imports it when it runs
    from qtool.convert.adapter_merge import MergeReport

RequantizeFormat = choice_enum("RequantizeFormat", tuple(QUANT_FORMATS))
REQUANTIZE = "Re-quantization (--requantize)"


def _format_of(report: MergeReport) -> str:
    if report.output_format == "float":
        return f"float ({report.output_dtype})"
    if report.output_format == "gptq":
        return f"gptq {report.bits}-bit, group {report.group_size}"
    return f"exl2 {report.bits_per_weight:.3f} bpw"


def summary_table(report: MergeReport) -> Table:
    table = Table(title=f"{report.base_format} + LoRA -> {report.output_format}: {report.output}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    adapter = report.adapter_summary
    table.add_row("adapter", f"rank {adapter.rank}, alpha {adapter.alpha:g}, {len(adapter.targets)} modules" + (", DoRA" if adapter.dora else "")
                  + (", rsLoRA" if adapter.rslora else ""))
    table.add_row("output", _format_of(report))
    if report.config_origin:
        table.add_row("config from", report.config_origin)
    table.add_row("adapter's effect", f"logits change {report.adapter_logits_rel_change:.3g} relative (merged float vs base)")
    logits = report.logits
    check = "bit-equal" if logits.max_abs_diff == 0.0 else f"max |diff| {logits.max_abs_diff:.3g}, relative {logits.rel_diff:.3g}, top-1 agreement {logits.top1_agreement:.1%}"
    table.add_row("output vs merged float", check)
    table.add_row("checked on", report.check_text)
    if report.ppl_output is not None:
        table.add_row(f"perplexity ({report.ppl_text})", f"{report.ppl_merged_float:.4g} merged float -> {report.ppl_output:.4g} output")
    table.add_row("seconds", f"{report.seconds:.1f}")
    return table


@handle_errors
def merge(
    base: Annotated[str, typer.Argument(metavar="BASE", help="The base model the adapter was trained on: float, GPTQ or EXL2 directory.")],
    adapter: Annotated[str, typer.Argument(metavar="ADAPTER", help="The LoRA adapter folder (adapter_config.json + adapter_model.safetensors).")],
    output: Annotated[str, typer.Argument(metavar="OUT", help="The output directory (appears only when complete and checked).")],
    requantize: Annotated[Optional[RequantizeFormat], typer.Option("--requantize", case_sensitive=False, help="Quantize the merged model to this format (default: write it as float); with the base's format, with the base's own config.")] = None,
    bits: Annotated[Optional[GptqBits], typer.Option("--bits", rich_help_panel=REQUANTIZE, help="gptq: bits per weight (default: the base's).")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", rich_help_panel=REQUANTIZE, help="gptq: input columns per scale (-1: per channel; default: the base's).")] = None,
    bpw: Annotated[Optional[float], typer.Option("--bpw", rich_help_panel=REQUANTIZE, help="exl2: average bits per weight, 2.0 to 8.0 (default: the base's).")] = None,
    calibration: Annotated[Optional[str], typer.Option("--calibration", rich_help_panel=REQUANTIZE, help="`wikitext` or a text file (default: the base's calibration).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, rich_help_panel=REQUANTIZE, help="Calibration windows (default: the base's).")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", min=1, rich_help_panel=REQUANTIZE, help="Tokens per calibration window (default: the base's).")] = None,
    config: Annotated[Optional[str], typer.Option("--config", rich_help_panel=REQUANTIZE, help="A quantization config file or preset to start from instead of the base's; flags override it.")] = None,
    perplexity: Annotated[Optional[str], typer.Option("--perplexity", help="Also report the perplexity of the merged float model and of the output on this text (a file or `wikitext`).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if qtool wrote it.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print only the report as JSON.")] = False,
    device: Annotated[str, typer.Option("--device", autocompletion=complete_device, help="auto, cpu, cuda or cuda:N: where the re-quantization runs.")] = "auto",
) -> None:
    """Merge a LoRA adapter into its base model and write it as float or quantized again.

    The output is loaded back and its logits compared with the merged float model's (the cost of the round trip).
    """
    from qtool.checkpoints.sources import resolve_device
    from qtool.convert.adapter_merge import MergeRequest, merge_adapter, plan_merge

    resolve_device(device)
    request = MergeRequest(base, adapter, output, requantize=plain(requantize), bits=plain(bits), group_size=group_size, bpw=bpw,
                           calibration=calibration, samples=samples, seqlen=seqlen, config_file=config, perplexity_text=perplexity,
                           force=force)
    plan_merge(request)  # refuse a bad request before any bar shows
    with progress_bar("merging", enabled=not json_output) as update:
        report = merge_adapter(request, device=device, progress=update)
    if json_output:
        print_json(report.to_dict())
        return
    stdout.print(summary_table(report))
    for note in report.notes:
        stderr.print(f"[dim]note: {note}[/]")
