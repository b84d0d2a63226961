"""`qtool quantize` as a library call: load the float model, cut the calibration windows, quantize the decoder
layers one by one (each layer's inputs come from the layers already quantized), and write the GPTQ checkpoint.

Work is saved after every layer beside the output, so a run interrupted and restarted with the same arguments
continues where it stopped and ends with the same bytes as an uninterrupted run."""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, raise_first_error
from qtool.core.output_claim import claimed_output
from qtool.core.output_path import check_output_path
from qtool.models.rules import ModelStats, validate_for_hardware, validate_for_model
from qtool.config.schema import QuantConfig
from qtool.checkpoints.gptq_checkpoint import save_quantized_model
from qtool.formats.gptq_config import qtool_version
from qtool.formats.gptq import check_gptq_layout
from qtool.data.text import calibration_windows
from qtool.quant.layer_quantizer import ModuleReport, quantize_layer, resolve_compute_dtype, solve_group
from qtool.formats.quantized_weight import QuantizedWeight
from qtool.quant.work_state import WorkState, job_fingerprint
from qtool.models.architectures import decoder_layers, get_architecture, resolve_layer_groups
from qtool.models.layerwise import LayerInputs, capture_layer_inputs, run_layer_batch, sample_batches, split_batch
from qtool.checkpoints.sources import ModelSource, load_model, resolve_device, resolve_source

log = logging.getLogger(__name__)

# (layers done, layers in all, what is being worked on)
Progress = Callable[[int, int, str], None]

# Calibration activations stay on the GPU only while they use at most this share of its free memory.
ACTIVATIONS_GPU_SHARE = 0.25


@dataclass
class QuantizeResult:
    output: str
    config: QuantConfig
    layers: int
    quantized_linears: int
    skipped_linears: dict[str, str]  # name -> why it stays float
    resumed_from_layer: int
    seconds: float
    peak_memory_bytes: int
    device: str
    calibration_tokens: int
    compute_dtype: str = "float32"  # what config.compute_dtype resolved to on this machine
    modules: list[ModuleReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["findings"] = [f.to_dict() for f in self.findings]
        return data


def source_identity(source: ModelSource) -> dict[str, Any]:
    """What identifies the input model's weights for resuming: its files with their sizes and times."""
    if source.path is None:
        return {"display": source.display}
    files = [source.path / source.gguf_file] if source.gguf_file else sorted(source.path.glob("*.safetensors"))
    return {
        "display": source.display,
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()],
    }


def storage_device(compute: torch.device, samples: int, seqlen: int, hidden_size: int) -> torch.device:
    """Calibration activations live on the GPU when they fit comfortably, else on the CPU."""
    if compute.type != "cuda":
        return compute
    free, _ = torch.cuda.mem_get_info(compute)
    # inputs, outputs and the recorded linear outputs of one layer: a few copies of the hidden states
    needed = 6 * samples * seqlen * hidden_size * 4
    return compute if needed <= ACTIVATIONS_GPU_SHARE * free else torch.device("cpu")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def split_quantizable(
    groups: list[list[tuple[str, nn.Linear]]], check_layout: Callable[[nn.Linear, str], None]
) -> tuple[list[list[tuple[str, nn.Linear]]], dict[str, str]]:
    """Drop the linears the output format cannot hold (check_layout raises a QtoolError for them): they stay
    float, as in GPTQModel, and the checkpoint says so (GPTQ's `dynamic` exclusions)."""
    kept_groups: list[list[tuple[str, nn.Linear]]] = []
    skipped: dict[str, str] = {}
    for group in groups:
        kept = []
        for name, linear in group:
            try:
                check_layout(linear, name)
            except QtoolError as exc:
                skipped[name] = exc.message
                continue
            kept.append((name, linear))
        if kept:
            kept_groups.append(kept)
    return kept_groups, skipped


def gptq_layout_check(config: QuantConfig) -> Callable[[nn.Linear, str], None]:
    return lambda linear, name: check_gptq_layout(linear.in_features, linear.out_features, config.bits, config.group_size, name)


def checkpoint_quantization_config(config: QuantConfig, skipped: dict[str, str], calibration_tokens: int, compute_dtype: str = "float32") -> dict[str, Any]:
    """The quantization_config written into config.json: GPTQModel's fields, the skipped linears as `dynamic`
    exclusions, and the whole qtool config (so the job can be read back exactly)."""
    data: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        # act order needs a Hessian: round to nearest keeps the natural column order whatever the config says
        "desc_act": config.desc_act and config.method == "gptq",
        "sym": config.sym,
        "static_groups": config.static_groups and config.method == "gptq",
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "damp_auto_increment": config.damp_auto_increment,
        "mse": 2.4 if config.mse else 0.0,
        "checkpoint_format": config.checkpoint_format,
        "meta": {
            "quantizer": [f"qtool:{qtool_version()}"],
            "qtool_config": config.to_dict(),
            "calibration_tokens": calibration_tokens,
            "compute_dtype": compute_dtype,
        },
    }
    if skipped:
        data["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in sorted(skipped)}
    return data


def check_against_model(config: QuantConfig, model: nn.Module, spec: Any, compute: torch.device) -> list[Finding]:
    """The model-aware and hardware rules of the shared validator, before any calibration work: raise the first
    error, return the rest."""
    shapes = {
        name: (linear.in_features, linear.out_features)
        for index in range(len(decoder_layers(model, spec)))
        for group in resolve_layer_groups(model, index, spec)
        for name, linear in group
    }
    findings = validate_for_model(config, shapes)
    findings += validate_for_hardware(config, ModelStats.from_config(model.config), compute)
    return raise_first_error(findings)


def _relative(groups: list[list[tuple[str, nn.Linear]]], prefix: str) -> list[list[tuple[str, nn.Linear]]]:
    return [[(name.removeprefix(prefix), linear) for name, linear in group] for group in groups]


def source_inputs(source: ModelSource, calibration_source: str, *others: str | Path | None) -> list[Path]:
    """The local files and folders a run reads, which its output must neither be, sit inside nor hold."""
    inputs = [source.path / source.gguf_file] if source.gguf_file else ([source.path] if source.path is not None else [])
    if Path(calibration_source).exists():  # `wikitext` names a data set, not a path
        inputs.append(Path(calibration_source))
    return inputs + [Path(other) for other in others if other is not None]


@dataclass
class _QuantizeJob:
    """What both ways of quantizing (calibrated and round-to-nearest) share: the loaded model and where and how
    its checkpoint is written."""

    model: nn.Module
    tokenizer: Any
    config: QuantConfig
    output: Path
    force: bool
    report: Callable[..., None]
    started: float
    compute: torch.device
    findings: list[Finding]
    num_layers: int
    model_name: str

    def write_checkpoint(self, quantized: dict[str, QuantizedWeight], skipped: dict[str, str],
                         modules: list[ModuleReport], calibration_tokens: int = 0, compute_dtype: str = "float32",
                         resumed_from: int = 0) -> QuantizeResult:
        if not quantized:
            raise QtoolError(f"no linear of {self.model_name} can be stored in the GPTQ layout",
                             "GPTQ needs input and output widths that are multiples of 32")
        self.report(self.num_layers, self.num_layers, "writing checkpoint")
        save_quantized_model(
            self.output, self.model, quantized,
            quantization_config=checkpoint_quantization_config(self.config, skipped, calibration_tokens, compute_dtype),
            tokenizer=self.tokenizer, checkpoint_format=self.config.checkpoint_format, force=self.force,
        )
        return QuantizeResult(
            output=str(self.output), config=self.config, layers=self.num_layers, quantized_linears=len(quantized),
            skipped_linears=skipped, resumed_from_layer=resumed_from, seconds=time.perf_counter() - self.started,
            peak_memory_bytes=peak_memory_bytes(self.compute), device=str(self.compute),
            calibration_tokens=calibration_tokens, compute_dtype=compute_dtype, modules=modules, findings=self.findings,
        )


def _round_to_nearest(job: _QuantizeJob, spec) -> QuantizeResult:
    quantized: dict[str, QuantizedWeight] = {}
    skipped: dict[str, str] = {}
    modules: list[ModuleReport] = []
    for index in range(job.num_layers):
        job.report(index, job.num_layers, f"layer {index + 1}/{job.num_layers}")
        groups, layer_skipped = split_quantizable(resolve_layer_groups(job.model, index, spec), gptq_layout_check(job.config))
        skipped.update(layer_skipped)
        for group in groups:
            layer_quantized, reports = solve_group(group, None, job.config)
            quantized.update(layer_quantized)
            modules.extend(reports)
    return job.write_checkpoint(quantized, skipped, modules)


def quantize_model(
    model_spec: str | Path,
    config: QuantConfig,
    output: str | Path,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    discard_resume: bool = False,
) -> QuantizeResult:
    """Quantize `model_spec` with `config` (already validated) into a GPTQ checkpoint at `output`. The state
    beside the output is saved after every layer and resumed by the next run with the same arguments (unless
    `discard_resume`); the output is locked against other runs until the checkpoint is written."""
    started = time.perf_counter()
    check_output_path(output)  # a refused path fails before a Hub model is fetched
    compute = resolve_device(device)
    if config.output_format != "gptq":
        raise QtoolError(f"output_format {config.output_format!r} is not written by this pipeline", "use output_format gptq")
    source = resolve_source(model_spec)
    with claimed_output(output, force, source_inputs(source, config.calibration.source)) as output:
        return _quantize(model_spec, source, config, output, compute, force, progress, allow_pickle, trust_remote_code, discard_resume, started)


def _quantize(model_spec: str | Path, source: ModelSource, config: QuantConfig, output: Path, compute: torch.device, force: bool,
              progress: Progress | None, allow_pickle: bool, trust_remote_code: bool, discard_resume: bool, started: float) -> QuantizeResult:
    report = progress or (lambda done, total, detail="": None)
    # The float model stays on the CPU in float32; each layer visits the compute device while it is quantized.
    loaded = load_model(source, device="cpu", dtype="float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if loaded.quantization_config:
        raise QtoolError(f"model {model_spec} is already quantized ({loaded.quantization_config.get('quant_method')})", "quantize a float model")
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise QtoolError(f"model {model_spec} has no tokenizer", "calibration text must be tokenized: add the tokenizer files to the model directory")
    spec = get_architecture(model)
    layers = decoder_layers(model, spec)
    num_layers = len(layers)
    findings = check_against_model(config, model, spec, compute)

    job = _QuantizeJob(model, tokenizer, config, output, force, report, started, compute, findings, num_layers,
                       str(model_spec))
    if config.method == "rtn":
        # Round to nearest looks at the weights alone: no calibration, no forward passes, nothing to resume.
        return _round_to_nearest(job, spec)

    calibration = config.calibration
    windows = calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seqlen, calibration.seed)
    calibration_tokens = sum(w.numel() for w in windows)
    hidden_size = int(getattr(model.config, "hidden_size", 0) or 0)
    storage = storage_device(compute, len(windows), calibration.seqlen, hidden_size)

    compute_dtype = str(resolve_compute_dtype(config.compute_dtype, compute)).removeprefix("torch.")
    fingerprint = job_fingerprint({
        "config": config.to_dict(),
        "compute_dtype": compute_dtype,
        "model": source_identity(source),
        "qtool": qtool_version(),
        "torch": torch.__version__,
        "device": compute.type,
    })
    state = WorkState.open(output, fingerprint, discard=discard_resume)
    resumed_from = state.completed_layers
    if resumed_from:
        log.info("resuming %s after layer %d of %d", output, resumed_from, num_layers)

    report(0, num_layers, "capturing calibration inputs")
    inputs: LayerInputs = capture_layer_inputs(model, windows, device="cpu", storage_device=storage, spec=spec)
    if resumed_from:
        inputs = LayerInputs(resumed_from, tuple(h.to(storage) for h in state.load_hidden()), inputs.calls)

    quantized: dict[str, QuantizedWeight] = {}
    skipped: dict[str, str] = {}
    modules: list[ModuleReport] = []
    for index in range(num_layers):
        prefix = f"{spec.layers_path}.{index}."
        groups, layer_skipped = split_quantizable(resolve_layer_groups(model, index, spec), gptq_layout_check(config))
        skipped.update(layer_skipped)
        if index < resumed_from:
            continue
        report(index, num_layers, f"layer {index + 1}/{num_layers}")
        layer = layers[index].to(compute)
        layer_inputs = inputs
        batches = sample_batches(layer_inputs)
        moved: dict = {}

        def run_batch(batch: int) -> torch.Tensor:
            return run_layer_batch(layer, layer_inputs, batches[batch], device=compute, moved=moved)

        def on_group(modules: str, index: int = index) -> None:
            report(index, num_layers, f"layer {index + 1}/{num_layers} {modules}")

        layer_quantized, layer_reports, batch_outputs = quantize_layer(
            layer, _relative(groups, prefix), len(batches), run_batch, config, storage, on_group=on_group,
            output_projections=spec.output_projections,
        )
        outputs = [h for out, samples in zip(batch_outputs, batches) for h in split_batch(out, layer_inputs, samples)]
        layers[index] = layer.to("cpu")
        for module_report in layer_reports:
            module_report.name = prefix + module_report.name
            log.debug("%s: error %.4g, damp %.4f, %.2fs", module_report.name, module_report.error, module_report.damp_percent, module_report.seconds)
        modules.extend(layer_reports)
        next_hidden = [h.to(storage) for h in outputs]
        # After every layer: any interruption loses at most the layer in progress.
        state.save_layer(index, {prefix + name: qw for name, qw in layer_quantized.items()}, next_hidden)
        inputs = inputs.advanced(next_hidden)
        report(index + 1, num_layers, f"layer {index + 1}/{num_layers}")

    # Every layer's weights come from the saved state, so a resumed run writes what an uninterrupted one would.
    for index in range(num_layers):
        quantized.update(state.load_layer(index))
    result = job.write_checkpoint(quantized, skipped, modules, calibration_tokens, compute_dtype, resumed_from)
    state.remove()
    return result
