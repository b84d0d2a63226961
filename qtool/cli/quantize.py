"""`qtool quantize MODEL --output OUT`: every flag goes through the shared config and its validator, so a bad
combination fails before any work; the library call does the rest; a rich bar shows layer i of N."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from rich.table import Table

from qtool.cli.choices import Bits, CheckpointFormat, ComputeDtype, HeadBits, Method, OutputFormat, complete_device
from qtool.cli.config_flags import QUANT_CONFIG_FLAGS, config_overrides, flag_of
from qtool.cli.preset_defaults import exl2_default, gptq_default, shared_default
from qtool.cli.render import handle_errors, print_findings, print_json, progress_bar, stderr, stdout
from qtool.core.byte_sizes import parse_byte_size
from qtool.core.errors import QtoolError
from qtool.config.schema import GPTQ_ONLY_FIELDS, QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, resolve_config

if TYPE_CHECKING:  # the pipelines import torch: the command imports them when it runs
    from qtool.quant.exl2_pipeline import Exl2QuantizeResult
    from qtool.quant.pipeline import QuantizeResult


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
        ("peak memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"
                        + (f" (estimated {result.estimated_peak_memory_bytes / 2**30:.2f} GiB before the run)" if result.estimated_peak_memory_bytes else "")),
    ]
    rows += memory_rows(result.memory)
    for name, value in rows:
        table.add_row(name, value)
    return table


ACTIVATION_PLACES = {"device": "on the compute device", "host": "in host memory", "disk": "on disk"}


def memory_rows(memory: dict) -> list[tuple[str, str]]:
    """The measured host peak beside the estimate made before the run, and where weights and activations were."""
    from qtool.models.rules import replay_note

    if not memory:
        return []
    estimate = memory["estimate"]
    return [("host memory", f"peak {memory['peak_host_bytes'] / 2**30:.2f} GiB (estimated {estimate['cpu_bytes'] / 2**30:.2f} GiB), weights "
                            + ("streamed layer by layer" if estimate["streaming"] else "loaded whole")
                            + f", activations {ACTIVATION_PLACES[estimate['activation_tier']]}" + replay_note(estimate)
                            + (f", the weighing pass's layer inputs {ACTIVATION_PLACES[estimate['weighing_tier']]}" if estimate.get("weighing_tier") else ""))]


def printing_estimate(update: Callable[..., None], enabled: bool) -> Callable[..., None]:
    """The progress callback, which also prints the pipeline's memory estimate as a line of its own before the run."""
    from qtool.quant.pipeline import ESTIMATE_DETAIL

    def report(done: int, total: int, detail: str = "") -> None:
        if enabled and detail.startswith(ESTIMATE_DETAIL):
            stderr.print(detail)
        update(done, total, detail)

    return report


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
        ("peak memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"
                        + (f" (estimated {result.estimated_peak_memory_bytes / 2**30:.2f} GiB before the run)" if result.estimated_peak_memory_bytes else "")),
    ]
    rows += memory_rows(result.memory)
    if result.vram_plan:
        rows.insert(1, ("--target-vram", result.vram_plan["summary"]))
    for name, value in rows:
        table.add_row(name, value)
    return table


# --help groups the options by what they set, and the --x/--no-x switches apart: a panel's columns (names, the
# negative names, types, help) share 80 characters, and a switch's two long names beside a long type leave the help
# too narrow and cut names with "…" (tests/cli/test_help_layout.py renders each at 80 columns)
SWITCHES = "Switches"
GPTQ_OUTPUT = "GPTQ output (--format gptq)"
EXL2_OUTPUT = "EXL2 output (--format exl2)"
CALIBRATION = "Calibration and Hessian"


def _refuse_gptq_flags(overrides: dict, output_format: str) -> None:
    """With EXL2 the optimizer picks widths and groups per linear: a GPTQ-only flag given there is a mistake."""
    if output_format != "exl2":
        return
    given = [field for field in GPTQ_ONLY_FIELDS if overrides.get(field) is not None]
    if given:
        raise QtoolError(f"{flag_of(given[0])} does not apply to {flag_of('output_format')} exl2",
                         f"EXL2 chooses widths and groups per linear: set {flag_of('bpw')} (or {flag_of('target_vram_gb')}) instead")


@handle_errors
def quantize(
    model: Annotated[Optional[str], typer.Argument(help="The float model: a directory, a .gguf file, a Hub id or an alias (smollm2-135m).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory to write the checkpoint to (appears only when complete).")] = None,
    output_format: Annotated[Optional[OutputFormat], typer.Option("--format", help="gptq (uniform width) or exl2 (mixed widths per linear for a target --bpw).")] = None,
    method: Annotated[Optional[Method], typer.Option("--method", show_default=shared_default("method"), help="gptq (error feedback, needs calibration) or rtn (round to nearest).")] = None,
    bits: Annotated[Optional[Bits], typer.Option("--bits", show_default=gptq_default("bits"), rich_help_panel=GPTQ_OUTPUT, help="Bits per weight of each GPTQ linear.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", show_default=gptq_default("group_size"), rich_help_panel=GPTQ_OUTPUT, help="Input columns per scale/zero (-1: one group per output channel).")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--no-sym", show_default=gptq_default("sym"), rich_help_panel=SWITCHES, help="gptq: symmetric grid (zero point fixed at the middle) or asymmetric.")] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", show_default=shared_default("desc_act"), rich_help_panel=SWITCHES, help="Act order: quantize columns by descending Hessian diagonal.")] = None,
    static_groups: Annotated[Optional[bool], typer.Option("--static-groups/--no-static-groups", show_default=gptq_default("static_groups"), rich_help_panel=SWITCHES, help="gptq, with act order: fix each group's grid before the columns move.")] = None,
    true_sequential: Annotated[Optional[bool], typer.Option("--true-sequential/--no-true-sequential", show_default=shared_default("true_sequential"), rich_help_panel=SWITCHES, help="Each group of linears sees the outputs of those quantized before it.")] = None,
    damp: Annotated[Optional[float], typer.Option("--damp", show_default=shared_default("damp"), rich_help_panel=CALIBRATION, help="Hessian damping as a fraction of its mean diagonal (raised automatically when needed).")] = None,
    mse: Annotated[Optional[bool], typer.Option("--mse/--no-mse", show_default=gptq_default("mse"), rich_help_panel=SWITCHES, help="gptq: search a clipped grid per group that minimises the weight error.")] = None,
    refine_scales: Annotated[Optional[bool], typer.Option("--refine-scales/--no-refine-scales", show_default=shared_default("refine_scales"), rich_help_panel=SWITCHES, help="After GPTQ, refit group scales to the layer's output error.")] = None,
    checkpoint_format: Annotated[Optional[CheckpointFormat], typer.Option("--checkpoint-format", show_default=gptq_default("checkpoint_format"), rich_help_panel=GPTQ_OUTPUT, help="gptq (v1 zeros, read everywhere) or gptq_v2 (keeps asym zero 0).")] = None,
    bpw: Annotated[Optional[float], typer.Option("--bpw", show_default=exl2_default("bpw"), rich_help_panel=EXL2_OUTPUT, help="exl2: average bits per weight of the decoder linears, 2.0 to 8.0.")] = None,
    head_bits: Annotated[Optional[HeadBits], typer.Option("--head-bits", show_default=exl2_default("head_bits"), rich_help_panel=EXL2_OUTPUT, help="exl2: bits of the output head (0 keeps it float16).")] = None,
    measurement: Annotated[Optional[str], typer.Option("--measurement", rich_help_panel=EXL2_OUTPUT, help="exl2: reuse the measurement.json of an earlier run of this model (skips the measurement pass).")] = None,
    target_vram: Annotated[Optional[float], typer.Option("--target-vram", rich_help_panel=EXL2_OUTPUT, help="exl2: choose the bpw so that weights + KV cache fit this many GB of GPU memory.")] = None,
    context_length: Annotated[Optional[int], typer.Option("--context-length", min=0, rich_help_panel=EXL2_OUTPUT, help="exl2 with --target-vram: tokens of KV cache to fit (default: the model's maximum).")] = None,
    compute_dtype: Annotated[Optional[ComputeDtype], typer.Option("--compute-dtype", show_default=shared_default("compute_dtype"), rich_help_panel=CALIBRATION, help="Dtype of the calibration forwards and Hessian products (the solve stays float32); auto = bfloat16 where the hardware has it.")] = None,
    calibration: Annotated[Optional[str], typer.Option("--calibration", show_default=shared_default("calibration"), rich_help_panel=CALIBRATION, help="`wikitext` (needs the Hub or its cache) or a text file.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, show_default=shared_default("samples"), rich_help_panel=CALIBRATION, help="Calibration windows.")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", min=1, show_default=shared_default("seqlen"), rich_help_panel=CALIBRATION, help="Tokens per calibration window.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", show_default=shared_default("seed"), rich_help_panel=CALIBRATION, help="Seed of the random window offsets.")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", min=0, rich_help_panel=CALIBRATION, help="Calibration tokens per forward call through a layer while it is quantized (whole windows; 0: 4096). More: fewer, larger calls for more memory.")] = None,
    config_file: Annotated[Optional[str], typer.Option("--config", help=f"A config file (.yaml/.json/.toml) or preset name (default: the preset {QUANTIZE_DEFAULT_PRESET}, with --format exl2 {QUANTIZE_EXL2_PRESET}); flags override it.")] = None,
    device: Annotated[str, typer.Option("--device", autocompletion=complete_device, help="auto, cpu, cuda or cuda:N: where each layer is quantized.")] = "auto",
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="gptq: processes sharing the calibration (one GPU each with cuda, gloo on the CPU); the checkpoint is the one-process one.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    discard_resume: Annotated[bool, typer.Option("--discard-resume", help="Throw away the saved state of an interrupted run into this output and start over.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log each module's error and damping.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result as JSON.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors file of the output, e.g. 5GB, 500MB, 2GiB (more: numbered shards and an index, as transformers writes).")] = "5GB",
    gpu_memory: Annotated[Optional[str], typer.Option("--gpu-memory", help="Hold the run to this much GPU memory, e.g. 12GB, 20GiB: activations are placed for it and a layer that outgrows it is redone lower down the memory ladder (same checkpoint).")] = None,
    jobs: Annotated[Optional[str], typer.Option("--jobs", help="A jobs file (a `jobs:` list of model, output and config fields): every job in turn, then eval --compare over the outputs.")] = None,
) -> None:
    """Quantize a float model into a GPTQ or EXL2 checkpoint (layer by layer, resumable)."""
    overrides = config_overrides(locals())  # first statement: locals() holds exactly the parsed arguments
    max_shard_size_bytes = parse_byte_size(max_shard_size, "--max-shard-size")
    gpu_memory_bytes = None if gpu_memory is None else parse_byte_size(gpu_memory, "--gpu-memory")
    if jobs is not None:
        given = [entry.flag for entry in QUANT_CONFIG_FLAGS if overrides[entry.override_key] is not None]
        given += [name for name, value in (("MODEL", model), ("--output", output), ("--config", config_file), ("--measurement", measurement)) if value is not None]
        if given:
            raise QtoolError(f"{given[0]} cannot be combined with --jobs", "set it per job (or under defaults:) in the jobs file")
        from qtool.cli.quantize_jobs import run_jobs_command

        run_jobs_command(jobs, device, nproc, force, discard_resume, as_json, max_shard_size_bytes, gpu_memory_bytes)
        return
    if model is None or output is None:
        raise QtoolError("no model given" if model is None else "--output is missing", "qtool quantize MODEL --output DIR, or qtool quantize --jobs FILE")
    if bpw is not None and target_vram is not None:
        raise QtoolError("--bpw and --target-vram both choose the bits per weight", "give one of them")
    preset = QUANTIZE_EXL2_PRESET if overrides["output_format"] == "exl2" else QUANTIZE_DEFAULT_PRESET
    config, findings = resolve_config(config_file or preset, overrides)
    _refuse_gptq_flags(overrides, config.output_format)
    if config.output_format == "exl2" and nproc > 1:
        raise QtoolError(f"--nproc {nproc} applies to {flag_of('output_format')} gptq only", "drop --nproc for EXL2")
    if config.output_format != "exl2" and measurement is not None:
        raise QtoolError("--measurement applies to --format exl2 only", "add --format exl2, or drop --measurement")
    from qtool.checkpoints.sources import resolve_device
    from qtool.core.output_path import check_output_path
    from qtool.quant.exl2_pipeline import quantize_model_exl2
    from qtool.quant.gpu_budget import check_gpu_budget
    from qtool.quant.pipeline import quantize_model

    check_gpu_budget(gpu_memory_bytes, resolve_device(device))
    # the pipelines check again with their inputs; checked here too so that a refused output fails before the bar
    check_output_path(output)
    if not as_json:
        print_findings(findings)
    if verbose:
        logging.getLogger("qtool.quant").setLevel(logging.DEBUG)
    if config.output_format == "exl2":
        with progress_bar("quantize", enabled=not as_json) as update:
            exl2_result = quantize_model_exl2(model, config, output, measurement=measurement, device=device, force=force,
                                              progress=printing_estimate(update, not as_json), discard_resume=discard_resume,
                                              max_shard_size_bytes=max_shard_size_bytes, gpu_memory_bytes=gpu_memory_bytes)
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
        result = quantize_model(model, config, output, device=device, force=force, progress=printing_estimate(update, not as_json),
                                discard_resume=discard_resume, nproc=nproc,
                                max_shard_size_bytes=max_shard_size_bytes, gpu_memory_bytes=gpu_memory_bytes)
    if as_json:
        print_json(result.to_dict())
        return
    print_findings(result.findings)
    if verbose:
        for module in result.modules:
            stderr.print(f"{module.name}: error {module.error:.4g}, damp {module.damp_percent:.4f}, {module.seconds:.2f} s")
    stdout.print(summary_table(result))
