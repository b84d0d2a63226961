"""`qtool quantize --format exl2` as a library call: a weighing pass (each linear's sensitivity: what its output
errors cost the loss, from forward and backward passes of the float model), a measurement pass (every linear of
every layer with every candidate, on the float model's calibration activations), the optimizer's pick per linear
for the target bpw,
then a quantization pass layer by layer (each layer's inputs from the layers already quantized, each group of
linears seeing the groups quantized before it) and the EXL2 checkpoint with measurement.json beside it.

A measurement can be reused for another bpw (measurement=...); one written before sensitivities were kept is
weighed again. The passes save their work beside the output as numbered steps (weighing, measuring layer i, then
quantizing layer i), so an interrupted run restarted with the same
arguments continues from the last saved step and writes the bytes an uninterrupted run would."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import logging
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
from qtool.config.schema import EXL2_BPW_RANGE, QuantConfig, validate_config
from qtool.checkpoints.exl2_checkpoint import MEASUREMENT_FILE, save_exl2_model
from qtool.checkpoints.gptq_checkpoint import DEFAULT_MAX_SHARD_SIZE_BYTES
from qtool.formats.exl2 import Exl2Weight, check_exl2_layout
from qtool.formats.gptq_config import qtool_version
from qtool.data.text import calibration_windows
from qtool.models.vram import FLOAT16_BYTES, ModelShape, VramPlan, plan_bpw_for_vram
from qtool.quant.exl2_optimize import (
    DEFAULT_CANDIDATES,
    HEAD_CANDIDATES,
    LinearMeasurement,
    measure_linear,
    measurement_from_dict,
    measurement_to_dict,
    optimize,
    reachable_bpw,
    weighed,
    with_sensitivities,
)
from qtool.quant.exl2_solver import Exl2Candidate, exl2_quantize
from qtool.quant.hessian import HessianAccumulator
from qtool.quant.sensitivity import linear_sensitivities
from qtool.quant.pipeline import check_against_model, peak_memory_bytes, source_identity, source_inputs, split_quantizable, storage_device
from qtool.quant.work_state import WorkState, job_fingerprint
from qtool.models.architectures import decoder_layers, get_architecture, get_module, resolve_layer_groups
from qtool.models.layerwise import LayerInputs, capture_layer_inputs, iter_layer_outputs, run_layer_batch, sample_batches
from qtool.checkpoints.sources import ModelSource, load_model, resolve_device, resolve_source

log = logging.getLogger(__name__)
MEASURE_P_GRID = 24  # a coarser scale search while measuring: 4x cheaper, errors ranked the same way
SENSITIVITY_WINDOWS = 32  # calibration windows through forward and backward (SmolLM2: 154 s on 2 CPU cores, layer by layer)
Progress = Callable[[int, int, str], None]


@dataclass
class Exl2QuantizeResult:
    output: str
    config: QuantConfig
    bits_per_weight: float  # of the decoder linears, as ExLlamaV2 counts (head excluded)
    measured: bool  # False when a given measurement was reused
    weighed: bool  # True when the linears' sensitivities were computed by this run (not taken from the measurement)
    layers: int
    quantized_linears: int
    skipped_linears: dict[str, str]  # name -> why it stays float
    resumed_from_step: int  # steps: weighing (unless the given measurement has sensitivities), measuring each layer
                            # (unless a measurement was given), then quantizing each
    seconds: float
    peak_memory_bytes: int
    device: str
    calibration_tokens: int
    errors: dict[str, float] = field(default_factory=dict)  # per linear, relative output error
    choices: dict[str, str] = field(default_factory=dict)  # per linear, the candidate picked
    findings: list[Finding] = field(default_factory=list)
    vram_plan: dict[str, Any] | None = None  # with target_vram_gb: how the bpw was chosen

    @property
    def target_bpw(self) -> float:
        return self.config.bpw

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["findings"] = [f.to_dict() for f in self.findings]
        return data


def _exl2_layout_check(linear: nn.Linear, name: str) -> None:
    check_exl2_layout(linear.in_features, linear.out_features, (8,), (linear.in_features,), name)


def _group_hessians(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: LayerInputs, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each group's Hessian (from its first linear's input) and the layer's outputs, in one pass over the samples."""
    accumulators = [HessianAccumulator(group[0][1].in_features, device=device) for group in groups]
    handles = [group[0][1].register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0].detach())) for group, acc in zip(groups, accumulators)]
    try:
        outputs = [out.to(inputs.hidden_states[0].device) for out in iter_layer_outputs(layer, inputs, device=device)]
    finally:
        for handle in handles:
            handle.remove()
    return [acc.hessian for acc in accumulators], outputs


class _InputTaken(Exception):
    """Raised by the hook of a one-group Hessian pass: the rest of the layer's forward is not needed."""


def _group_hessian(layer: nn.Module, group: list[tuple[str, nn.Linear]], inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    """The Hessian of one group's input, each batch's forward stopped as soon as the group's first linear receives
    it (the layer's outputs come from a later pass, once every group is quantized)."""
    accumulator = HessianAccumulator(group[0][1].in_features, device=device)

    def take(module: nn.Module, args: tuple) -> None:
        accumulator.add_batch(args[0].detach())
        raise _InputTaken

    handle = group[0][1].register_forward_pre_hook(take)
    moved: dict = {}
    try:
        for samples in sample_batches(inputs):
            try:
                run_layer_batch(layer, inputs, samples, device=device, moved=moved)
            except _InputTaken:
                pass
    finally:
        handle.remove()
    return accumulator.hessian


def measure_layer(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: LayerInputs, device: torch.device,
                  damp_percent: float, candidates=DEFAULT_CANDIDATES) -> tuple[list[LinearMeasurement], list[torch.Tensor]]:
    """Every linear of one float layer measured with every candidate, and the layer's outputs (the next layer's
    inputs). `groups` are the layer's quantizable linears with their full names."""
    layer.to(device)
    hessians, outputs = _group_hessians(layer, groups, inputs, device)
    measurements = [
        measure_linear(name, linear.weight.data, hessian, candidates, damp_percent=damp_percent, p_grid=MEASURE_P_GRID)
        for group, hessian in zip(groups, hessians)
        for name, linear in group
    ]
    layer.to("cpu")
    return measurements, outputs


def quantize_exl2_layer(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: LayerInputs, choices: dict[str, Exl2Candidate],
                        device: torch.device, damp_percent: float, refine: bool = False) -> tuple[dict[str, Exl2Weight], dict[str, float], list[torch.Tensor]]:
    """Quantize each chosen linear of one layer, each group's Hessian from a pass in which the groups before it
    already hold their quantized weights; returns the weights, their errors and the layer's outputs."""
    layer.to(device)
    weights, errors = {}, {}
    for group in [[(n, m) for n, m in g if n in choices] for g in groups]:
        if not group:
            continue
        hessian = _group_hessian(layer, group, inputs, device)
        for name, linear in group:
            bits, sizes = choices[name].layout(linear.in_features)
            result = exl2_quantize(linear.weight.data, hessian, bits, sizes, damp_percent=damp_percent, refine=refine)
            weights[name], errors[name] = result.weight, result.error
            linear.weight.data = result.dequantized.to(linear.weight.dtype)  # later groups see the quantized ones
    outputs = [out.to(inputs.hidden_states[0].device) for out in iter_layer_outputs(layer, inputs, device=device)]
    layer.to("cpu")
    return weights, errors, outputs


def weigh_linears(model: nn.Module, layer_groups: list[list[list[tuple[str, nn.Linear]]]], windows: list[torch.Tensor],
                  device: torch.device, count: int = SENSITIVITY_WINDOWS) -> dict[str, float]:
    """Each quantizable linear's sensitivity from the first `count` calibration windows, one layer at a time on
    `device`, every layer's inputs kept on the CPU (quant/sensitivity.py)."""
    names = {name for groups in layer_groups for group in groups for name, _ in group}
    return linear_sensitivities(model, windows[:count], names=names, device=device)


# ---- the saved steps: sensitivities and measurements as JSON metadata, EXL2 weights as tensors ----


def _measurement_step(measurements: list[LinearMeasurement]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return {}, {"measurement": json.dumps(measurement_to_dict(measurements))}


def _measurements_of_step(metadata: dict[str, str]) -> list[LinearMeasurement]:
    return measurement_from_dict(json.loads(metadata["measurement"]), "saved measurement step")


def _weights_step(weights: dict[str, Exl2Weight], errors: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = {}, {}
    for name, w in weights.items():
        tensors[f"{name}.codes"] = w.codes.to(torch.uint8)
        tensors[f"{name}.qscale"] = w.qscale.to(torch.uint8)
        tensors[f"{name}.scale_max"] = w.scale_max
        tensors[f"{name}.perm"] = w.perm.to(torch.int32)
        metadata[name] = json.dumps({"group_bits": list(w.group_bits), "group_sizes": list(w.group_sizes), "error": errors[name]})
    return tensors, metadata


def _weights_of_step(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict[str, Exl2Weight], dict[str, float]]:
    weights, errors = {}, {}
    for name, text in metadata.items():
        facts = json.loads(text)
        weights[name] = Exl2Weight(
            codes=tensors[f"{name}.codes"].to(torch.int32),
            qscale=tensors[f"{name}.qscale"].to(torch.int32),
            scale_max=tensors[f"{name}.scale_max"],
            group_bits=tuple(facts["group_bits"]),
            group_sizes=tuple(facts["group_sizes"]),
            perm=tensors[f"{name}.perm"].to(torch.int64),
        )
        errors[name] = float(facts["error"])
    return weights, errors


def _quantize_head(model: nn.Module, inputs: LayerInputs, head_bits: int, device: torch.device, refine: bool = False) -> tuple[str, Exl2Weight, float]:
    spec = get_architecture(model)
    norm, head = get_module(model, spec.norm_path), get_module(model, spec.head_path)
    accumulator = HessianAccumulator(head.in_features, device=device)
    norm.to(device)
    with torch.no_grad():
        for hidden in inputs.hidden_states:
            accumulator.add_batch(norm(hidden.to(device)))
    norm.to("cpu")
    bits, sizes = HEAD_CANDIDATES[head_bits].layout(head.in_features)
    result = exl2_quantize(head.weight.data, accumulator.hessian, bits, sizes, refine=refine)
    return spec.head_path, result.weight, result.error


def _plan_for_vram(model: nn.Module, layer_groups: list[list[list[tuple[str, nn.Linear]]]], config: QuantConfig) -> VramPlan:
    """The bpw at which this model fits config.target_vram_gb: every tensor but the quantized decoder linears
    counts as float16 (tied tensors once), a quantized head at its candidate's bits."""
    spec = get_architecture(model)
    quantized = {name for groups in layer_groups for group in groups for name, _ in group}
    head = get_module(model, spec.head_path)
    seen, fixed_bytes = set(), 0
    for name, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            if name in quantized or param.data_ptr() in seen or (config.head_bits and module is head):
                continue
            seen.add(param.data_ptr())
            fixed_bytes += param.numel() * FLOAT16_BYTES
    if config.head_bits:
        fixed_bytes += math.ceil(HEAD_CANDIDATES[config.head_bits].total_bits(head.in_features, head.out_features) / 8)
    weights = sum(linear.in_features * linear.out_features for groups in layer_groups for group in groups for _, linear in group)
    return plan_bpw_for_vram(ModelShape.from_config(model.config), weights, fixed_bytes, config.target_vram_gb, config.context_length, EXL2_BPW_RANGE)


def _read_measurement(path: str | Path | None) -> tuple[list[LinearMeasurement] | None, str | None]:
    """The measurements of an earlier run and a digest of the file (part of the job's identity), or (None, None)."""
    if path is None:
        return None, None
    path = Path(path)
    try:
        text = path.read_text()
        return measurement_from_dict(json.loads(text), str(path)), hashlib.sha256(text.encode()).hexdigest()
    except (OSError, json.JSONDecodeError) as exc:
        raise QtoolError(f"cannot read the measurement {path}: {exc}", "pass the measurement.json of an earlier run of this model") from exc


def _checkpoint_config(config: QuantConfig, calibration_tokens: int, bits_per_weight: float) -> dict[str, Any]:
    calibration = config.calibration
    return {
        "bits": config.bpw,
        "head_bits": config.head_bits,
        "calibration": {"rows": calibration.samples, "length": calibration.seqlen, "dataset": Path(calibration.source).name},
        "meta": {"quantizer": [f"qtool:{qtool_version()}"], "qtool_config": config.to_dict(), "calibration_tokens": calibration_tokens,
                 "bits_per_weight": bits_per_weight},
    }


def quantize_model_exl2(
    model_spec: str | Path,
    config: QuantConfig,
    output: str | Path,
    measurement: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    discard_resume: bool = False,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
) -> Exl2QuantizeResult:
    """Quantize a float model to EXL2 at config.bpw (the head at config.head_bits: 0 = float16, 6 or 8), reusing
    `measurement` (an earlier run's measurement.json) when given. Work is saved beside the output after every
    step and resumed by the next run with the same arguments (unless `discard_resume`); the output is locked
    against other runs until the checkpoint is written."""
    started = time.perf_counter()
    check_output_path(output)  # a refused path fails before a Hub model is fetched
    if config.output_format != "exl2":
        raise QtoolError(f"output_format {config.output_format!r} is not written by the EXL2 pipeline", "use output_format exl2 (--format exl2)")
    findings = raise_first_error(validate_config(config))
    reused, measurement_digest = _read_measurement(measurement)
    compute = resolve_device(device)
    source = resolve_source(model_spec)
    with claimed_output(output, force, source_inputs(source, config.calibration.source, measurement)) as output:
        return _quantize_exl2(model_spec, source, config, output, reused, measurement, measurement_digest, compute, force, progress,
                              discard_resume, findings, started, max_shard_size_bytes)


def _quantize_exl2(model_spec: str | Path, source: ModelSource, config: QuantConfig, output: Path, reused, measurement, measurement_digest: str | None,
                   compute: torch.device, force: bool, progress: Progress | None, discard_resume: bool, findings: list,
                   started: float, max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES) -> Exl2QuantizeResult:
    report = progress or (lambda done, total, detail="": None)
    loaded = load_model(source, device="cpu", dtype="float32")
    if loaded.quantization_config:
        raise QtoolError(f"model {model_spec} is already quantized ({loaded.quantization_config.get('quant_method')})", "quantize a float model")
    if loaded.tokenizer is None:
        raise QtoolError(f"model {model_spec} has no tokenizer", "calibration text must be tokenized: add the tokenizer files")
    model = loaded.model
    spec = get_architecture(model)
    layers = decoder_layers(model, spec)
    num_layers = len(layers)
    findings += check_against_model(config, model, spec, compute)
    skipped: dict[str, str] = {}
    layer_groups = []
    for index in range(num_layers):
        groups, layer_skipped = split_quantizable(resolve_layer_groups(model, index, spec), _exl2_layout_check)
        layer_groups.append(groups)
        skipped.update(layer_skipped)
    if reused is not None:
        names = {name for groups in layer_groups for group in groups for name, _ in group}
        unknown = sorted({m.name for m in reused} ^ names)
        if unknown:
            raise QtoolError(f"the measurement {measurement} does not match this model's linears (e.g. {', '.join(unknown[:3])})", "measure this model (omit --measurement)")
    plan = _plan_for_vram(model, layer_groups, config) if config.target_vram_gb else None
    if plan is not None:
        config = dataclasses.replace(config, bpw=plan.bpw)
        log.info("--target-vram: %s", plan.describe())

    calibration = config.calibration
    windows = calibration_windows(loaded.tokenizer, calibration.source, calibration.samples, calibration.seqlen, calibration.seed)
    calibration_tokens = sum(w.numel() for w in windows)
    storage = storage_device(compute, len(windows), calibration.seqlen, int(getattr(model.config, "hidden_size", 0) or 0))
    fingerprint = job_fingerprint({
        "format": "exl2", "config": config.to_dict(), "model": source_identity(source), "measurement": measurement_digest,
        "qtool": qtool_version(), "torch": torch.__version__, "device": compute.type,
    })
    state = WorkState.open(output, fingerprint, discard=discard_resume)
    weigh_steps = 0 if reused is not None and weighed(reused) else 1
    measure_steps = 0 if reused is not None else num_layers
    first_measure, first_quantize = weigh_steps, weigh_steps + measure_steps
    total_steps = first_quantize + num_layers
    resumed_from = state.completed_layers
    if weigh_steps and resumed_from == 0:
        report(0, total_steps, "weighing the linears (forward and backward passes)")
        sensitivities = weigh_linears(model, layer_groups, windows, compute)
        state.save_step(0, {}, {"sensitivity": json.dumps(sensitivities)}, [])
    report(weigh_steps, total_steps, "capturing calibration inputs")
    captured = inputs = capture_layer_inputs(model, windows, device="cpu", storage_device=storage, spec=spec)
    if resumed_from not in (0, first_measure, first_quantize):  # the saved hidden states feed the next step
        log.info("resuming %s after step %d of %d", output, resumed_from, total_steps)
        layer = resumed_from - first_measure if resumed_from < first_quantize else resumed_from - first_quantize
        inputs = LayerInputs(layer, tuple(h.to(storage) for h in state.load_hidden()), inputs.calls)
    for step in range(max(resumed_from, first_measure), first_quantize):
        index = step - first_measure
        report(step, total_steps, f"measuring layer {index + 1}/{num_layers}")
        measured, outputs = measure_layer(layers[index], layer_groups[index], inputs, compute, config.damp_percent)
        outputs = [h.to(storage) for h in outputs]
        state.save_step(step, *_measurement_step(measured), outputs)
        inputs = inputs.advanced(outputs)
    measurements = reused if reused is not None else [m for step in range(first_measure, first_quantize) for m in _measurements_of_step(state.load_step(step)[1])]
    if weigh_steps:
        measurements = with_sensitivities(measurements, json.loads(state.load_step(0)[1]["sensitivity"]))
    if plan is not None:  # the budget's bpw, within what the candidates can reach
        low, high = reachable_bpw(measurements)
        if plan.bpw < low:
            raise QtoolError(f"--target-vram {config.target_vram_gb:g} GB leaves {plan.bpw:.2f} bpw, below the least the candidates reach ({low:.2f})", "raise --target-vram or lower --context-length")
        config = dataclasses.replace(config, bpw=round(min(plan.bpw, high), 2))
    allocation = optimize(measurements, config.bpw)

    if resumed_from <= first_quantize:  # the quantization pass starts again from the embeddings' outputs
        inputs = captured
    for step in range(max(resumed_from, first_quantize), total_steps):
        index = step - first_quantize
        report(step, total_steps, f"quantizing layer {index + 1}/{num_layers}")
        weights, errors, outputs = quantize_exl2_layer(layers[index], layer_groups[index], inputs, allocation.choices, compute, config.damp_percent,
                                                       refine=config.refine_scales)
        outputs = [h.to(storage) for h in outputs]
        state.save_step(step, *_weights_step(weights, errors), outputs)
        inputs = inputs.advanced(outputs)

    # Every layer's weights come from the saved state, so a resumed run writes what an uninterrupted one would.
    weights, errors = {}, {}
    for step in range(first_quantize, total_steps):
        step_weights, step_errors = _weights_of_step(*state.load_step(step))
        weights.update(step_weights)
        errors.update(step_errors)
    if not weights:
        raise QtoolError(f"no linear of {model_spec} can be stored in EXL2", "EXL2 needs input widths that are multiples of 32")
    if config.head_bits:
        report(total_steps, total_steps, "quantizing the head")
        name, weight, error = _quantize_head(model, inputs, config.head_bits, compute, refine=config.refine_scales)
        weights[name], errors[name] = weight, error
    report(total_steps, total_steps, "writing checkpoint")
    meta = {"model": str(model_spec), "calibration": asdict(calibration)}
    save_exl2_model(output, model, weights, _checkpoint_config(config, calibration_tokens, allocation.bits_per_weight), loaded.tokenizer,
                    measurement=measurement_to_dict(measurements, meta), max_shard_size_bytes=max_shard_size_bytes, force=force)
    state.remove()
    log.info("wrote %s with %s", output, MEASUREMENT_FILE)
    return Exl2QuantizeResult(
        output=str(output),
        config=config,
        bits_per_weight=allocation.bits_per_weight,
        measured=reused is None,
        weighed=bool(weigh_steps),
        layers=num_layers,
        quantized_linears=len(weights),
        skipped_linears=skipped,
        resumed_from_step=resumed_from,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=peak_memory_bytes(compute),
        device=str(compute),
        calibration_tokens=calibration_tokens,
        errors=errors,
        choices={name: candidate.describe() for name, candidate in allocation.choices.items()},
        findings=findings,
        vram_plan=None if plan is None else plan.to_dict(),
    )
