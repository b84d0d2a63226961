"""`qtool convert SRC_FORMAT DST_FORMAT SRC OUT`: gptq -> exl2, exl2 -> gptq, gptq|exl2 -> float; prints what
was kept exactly, what was rounded, and the logits check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from qtool.cli.choices import GptqBits, HeadBits, SourceFormat, TargetFormat, plain
from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError

if TYPE_CHECKING:  # the conversions import torch: the command imports them when it runs
    from qtool.convert.convert import ConversionReport

WORST_SHOWN = 8


def summary_table(report: ConversionReport) -> Table:
    table = Table(title=f"{report.source_format} -> {report.target_format}: {report.output}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    exact = sum(1 for linear in report.linears if linear.exact)
    table.add_row("linears", f"{len(report.linears)} ({exact} exact, {len(report.linears) - exact} rounded)")
    table.add_row("lossless", "yes" if report.lossless else "no")
    if report.linears:
        worst = max(report.linears, key=lambda linear: linear.rel_error)
        table.add_row("largest weight change", f"{worst.rel_error:.3g} relative ({worst.name})")
    if report.bits_per_weight is not None:
        table.add_row("bits per weight", f"{report.bits_per_weight:.3f}")
    check = "bit-equal" if report.logits_max_abs_diff == 0.0 else f"max |diff| {report.logits_max_abs_diff:.3g}, relative {report.logits_rel_diff:.3g}"
    table.add_row(f"logits check ({report.logits_dtype})", check)
    table.add_row("seconds", f"{report.seconds:.1f}")
    return table


def worst_table(report: ConversionReport) -> Table | None:
    rounded = sorted((linear for linear in report.linears if not linear.exact), key=lambda linear: -linear.rel_error)
    if not rounded:
        return None
    table = Table(title=f"rounded linears (largest {min(WORST_SHOWN, len(rounded))} of {len(rounded)})")
    for column in ("linear", "from", "to", "relative change", "why"):
        table.add_column(column, overflow="fold")
    for linear in rounded[:WORST_SHOWN]:
        table.add_row(linear.name, linear.source, linear.target, f"{linear.rel_error:.3g}", linear.note)
    return table


@handle_errors
def convert(
    src_format: Annotated[SourceFormat, typer.Argument(metavar="SRC_FORMAT", case_sensitive=False, help="Format of SRC (a float model is quantized with qtool quantize).")],
    dst_format: Annotated[TargetFormat, typer.Argument(metavar="DST_FORMAT", case_sensitive=False, help="Format to write (float: float16).")],
    src: Annotated[str, typer.Argument(metavar="SRC", help="The checkpoint directory to convert.")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="The output directory (appears only when complete and checked).")],
    bits: Annotated[Optional[GptqBits], typer.Option("--bits", help="exl2 -> gptq: the GPTQ width (default: the model's own if uniform, else the nearest).")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="exl2 -> gptq: GPTQ group size (default: the largest that cuts every EXL2 group).")] = None,
    bpw: Annotated[Optional[float], typer.Option("--bpw", help="gptq -> exl2: quantize again to this bits per weight (2.0..8.0) instead of repacking; needs --calibration.")] = None,
    calibration: Annotated[Optional[str], typer.Option("--calibration", help="With --bpw: `wikitext` or a text file.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="With --bpw: calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option("--seqlen", min=1, help="With --bpw: tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="With --bpw: seed of the window choice.")] = 0,
    head_bits: Annotated[HeadBits, typer.Option("--head-bits", help="With --bpw: bits of the output head (0 keeps it float16).")] = HeadBits(0),
    target_vram: Annotated[Optional[float], typer.Option("--target-vram", help="gptq -> exl2: quantize again to the bpw at which weights + KV cache fit this many GB; needs --calibration.")] = None,
    context_length: Annotated[int, typer.Option("--context-length", min=0, help="With --target-vram: tokens of KV cache to fit (default: the model's maximum).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the report as JSON.")] = False,
) -> None:
    """Convert a quantized checkpoint to another format, checked by logits.

    The result is loaded back and its logits on a fixed prompt compared with the source's (bit-equal when no weight changed).
    """
    if bpw is None and target_vram is None and calibration is not None:
        raise QtoolError("--calibration applies with --bpw or --target-vram only", "add --bpw X to quantize again, or drop --calibration")
    src_format, dst_format, bits = plain(src_format), plain(dst_format), plain(bits)
    from qtool.convert.convert import Requantize, check_request, convert_checkpoint

    requantize = None
    if bpw is not None or target_vram is not None:
        requantize = Requantize(bpw=bpw, calibration=calibration or "", samples=samples, seqlen=seqlen, seed=seed, head_bits=plain(head_bits),
                                target_vram_gb=target_vram or 0.0, context_length=context_length)
    check_request(src_format, dst_format, Path(src), Path(out), force, bits, group_size, requantize)  # fail before any bar shows
    with progress_bar("converting", enabled=not as_json) as update:
        report = convert_checkpoint(src_format, dst_format, src, out, force=force, bits=bits, group_size=group_size, progress=update, requantize=requantize)
    if as_json:
        print_json(report.to_dict())
        return
    stdout.print(summary_table(report))
    worst = worst_table(report)
    if worst is not None:
        stdout.print(worst)
    for note in report.notes:
        stderr.print(f"[dim]note: {note}[/]")
