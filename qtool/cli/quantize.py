"""`qtool quantize MODEL --output OUT`: every flag goes through the shared config and its validator, so a bad
combination fails before any work; the library call does the rest; a rich bar shows layer i of N."""

from __future__ import annotations

import logging
from typing import Optional

import typer
from rich.table import Table

from qtool.cli.render import handle_errors, print_findings, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError
from qtool.config.schema import GPTQ_ONLY_FIELDS, QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, resolve_config
from qtool.formats.gptq import GPTQ_BITS
from qtool.quant.exl2_pipeline import Exl2QuantizeResult, quantize_model_exl2
from qtool.quant.pipeline import QuantizeResult, quantize_model
from qtool.checkpoints.sources import resolve_device


def summary_table(result: QuantizeResult) -> Table:
    config = result.config
    table = Table(title=f"quantized into {result.output}")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    rows = [
        ("method", f"{config.method}, {config.bits}-bit, group {config.group_size}, {'sym' if config.sym else 'asym'}"
                   + (", act order" if config.desc_act else "") + (", static groups" if config.static_groups else "")),
        ("linears", f"{result.quantized_linears} quantized, {len(result.skipped_linears)} kept float16"),
        ("calibration", f"{config.calibration.samples} x {config.calibration.seqlen} tokens of {config.calibration.source}"),
        ("layers", f"{result.layers}" + (f" (resumed after layer {result.resumed_from_layer})" if result.resumed_from_layer else "")),
        ("time", f"{result.seconds:.1f} s on {result.device}"),
        ("peak memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def exl2_summary_table(result: Exl2QuantizeResult) -> Table:
    config = result.config
    table = Table(title=f"quantized into {result.output}")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    widths: dict[str, int] = {}
    for choice in result.choices.values():
        widths[choice] = widths.get(choice, 0) + 1
    rows = [
        ("format", f"EXL2, target {config.bpw:g} bpw, head " + (f"{config.head_bits}-bit" if config.head_bits else "float16")),
        ("bits per weight", f"{result.bits_per_weight:.3f} (decoder linears, scales and permutations included)"),
        ("linears", f"{result.quantized_linears} quantized, {len(result.skipped_linears)} kept float16"),
        ("settings used", ", ".join(f"{count} x {choice}" for choice, count in sorted(widths.items(), key=lambda kv: -kv[1])[:4])
                          + (" ..." if len(widths) > 4 else "")),
        ("measurement", ("measured in this run" if result.measured else "reused from --measurement")
                        + (", linears weighed by their loss sensitivity in this run" if result.weighed else ", with its sensitivities")),
        ("calibration", f"{config.calibration.samples} x {config.calibration.seqlen} tokens of {config.calibration.source}"),
        ("layers", f"{result.layers}" + (f" (resumed after step {result.resumed_from_step})" if result.resumed_from_step else "")),
        ("time", f"{result.seconds:.1f} s on {result.device}"),
        ("peak memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"),
    ]
    if result.vram_plan:
        rows.insert(1, ("--target-vram", result.vram_plan["summary"]))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _refuse_gptq_flags(overrides: dict, output_format: str) -> None:
    """With EXL2 the optimizer picks widths and groups per linear: a GPTQ-only flag given there is a mistake."""
    if output_format != "exl2":
        return
    given = [key for key in GPTQ_ONLY_FIELDS if overrides.get(key) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise QtoolError(f"{flag} does not apply to --format exl2", "EXL2 chooses widths and groups per linear: set --bpw (or --target-vram) instead")


@handle_errors
def quantize(
    model: str = typer.Argument(..., help="The float model: a directory, a .gguf file, a Hub id or an alias (smollm2-135m)."),
    output: str = typer.Option(..., "--output", "-o", help="Directory to write the checkpoint to (appears only when complete)."),
    method: Optional[str] = typer.Option(None, "--method", help="gptq (error feedback, needs calibration) or rtn (round to nearest)."),
    bits: Optional[int] = typer.Option(None, "--bits", help=f"{', '.join(map(str, GPTQ_BITS[:-1]))} or {GPTQ_BITS[-1]}."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Input columns per scale/zero (-1: one group per output channel)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--no-sym", help="Symmetric grid (zero point fixed at the middle) or asymmetric."),
    desc_act: Optional[bool] = typer.Option(None, "--desc-act/--no-desc-act", help="Act order: quantize columns by descending Hessian diagonal."),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--no-static-groups", help="With act order: fix each group's grid before the columns move."),
    true_sequential: Optional[bool] = typer.Option(None, "--true-sequential/--no-true-sequential", help="Each group of linears sees the outputs of those quantized before it."),
    damp: Optional[float] = typer.Option(None, "--damp", help="Hessian damping as a fraction of its mean diagonal (raised automatically when needed)."),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="Search a clipped grid per group that minimises the weight error."),
    refine_scales: Optional[bool] = typer.Option(None, "--refine-scales/--no-refine-scales", help="After GPTQ, refit group scales to the layer's output error."),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", help="auto, float32, bfloat16 or float16: dtype of the calibration forwards and Hessian products (the solve stays float32); auto = bfloat16 where the hardware has it."),
    checkpoint_format: Optional[str] = typer.Option(None, "--checkpoint-format", help="gptq (v1 zeros, read everywhere) or gptq_v2 (keeps asym zero 0)."),
    output_format: Optional[str] = typer.Option(None, "--format", help="gptq (uniform width) or exl2 (mixed widths per linear for a target --bpw)."),
    bpw: Optional[float] = typer.Option(None, "--bpw", help="exl2: average bits per weight of the decoder linears, 2.0 to 8.0 (default 4.0)."),
    head_bits: Optional[int] = typer.Option(None, "--head-bits", help="exl2: bits of the output head: 0 keeps it float16, 6 or 8."),
    measurement: Optional[str] = typer.Option(None, "--measurement", help="exl2: reuse the measurement.json of an earlier run of this model (skips the measurement pass)."),
    target_vram: Optional[float] = typer.Option(None, "--target-vram", help="exl2: choose the bpw so that weights + KV cache fit this many GB of GPU memory."),
    context_length: Optional[int] = typer.Option(None, "--context-length", help="exl2 with --target-vram: tokens of KV cache to fit (default: the model's maximum)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="`wikitext` (needs the Hub or its cache) or a text file."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Calibration windows (default 128)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per calibration window (default 512)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random window offsets."),
    config_file: Optional[str] = typer.Option(None, "--config", help=f"A config file (.yaml/.json/.toml) or preset name (default: the preset {QUANTIZE_DEFAULT_PRESET}, with --format exl2 {QUANTIZE_EXL2_PRESET}); flags override it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N: where each layer is quantized."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    verbose: bool = typer.Option(False, "--verbose", help="Log each module's error and damping."),
    as_json: bool = typer.Option(False, "--json", help="Print only the result as JSON."),
) -> None:
    """Quantize a float model into a GPTQ or EXL2 checkpoint (layer by layer, resumable)."""
    overrides = {
        "method": method, "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
        "static_groups": static_groups, "true_sequential": true_sequential, "damp_percent": damp, "mse": mse,
        "refine_scales": refine_scales, "compute_dtype": compute_dtype,
        "checkpoint_format": checkpoint_format, "calibration_source": calibration, "samples": samples,
        "seqlen": seqlen, "seed": seed, "output_format": output_format, "bpw": bpw, "head_bits": head_bits,
        "target_vram_gb": target_vram, "context_length": context_length,
    }
    if bpw is not None and target_vram is not None:
        raise QtoolError("--bpw and --target-vram both choose the bits per weight", "give one of them")
    preset = QUANTIZE_EXL2_PRESET if output_format == "exl2" else QUANTIZE_DEFAULT_PRESET
    config, findings = resolve_config(config_file or preset, overrides)
    _refuse_gptq_flags(overrides, config.output_format)
    if config.output_format != "exl2" and measurement is not None:
        raise QtoolError("--measurement applies to --format exl2 only", "add --format exl2, or drop --measurement")
    resolve_device(device)
    if not as_json:
        print_findings(findings)
    if verbose:
        logging.getLogger("qtool.quant").setLevel(logging.DEBUG)
    if config.output_format == "exl2":
        with progress_bar("quantize", enabled=not as_json) as update:
            exl2_result = quantize_model_exl2(model, config, output, measurement=measurement, device=device, force=force, progress=update)
        if as_json:
            print_json(exl2_result.to_dict())
            return
        print_findings(exl2_result.findings)
        if verbose:
            for name, error in exl2_result.errors.items():
                stderr.print(f"{name}: {exl2_result.choices.get(name, 'head')}, error {error:.4g}")
        stdout.print(exl2_summary_table(exl2_result))
        return
    with progress_bar("quantize", enabled=not as_json) as update:
        result = quantize_model(model, config, output, device=device, force=force, progress=update)
    if as_json:
        print_json(result.to_dict())
        return
    print_findings(result.findings)
    if verbose:
        for module in result.modules:
            stderr.print(f"{module.name}: error {module.error:.4g}, damp {module.damp_percent:.4f}, {module.seconds:.2f} s")
    stdout.print(summary_table(result))
