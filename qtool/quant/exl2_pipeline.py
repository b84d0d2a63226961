"""`qtool quantize --format exl2` as a library call: a weighing pass (each linear's sensitivity: what its output
errors cost the loss, from forward and backward passes of the float model), a measurement pass (every linear of
every layer with every candidate, on the float model's calibration activations), the optimizer's pick per linear
for the target bpw,
then a quantization pass layer by layer (each layer's inputs from the layers already quantized, each group of
linears seeing the groups quantized before it) and the EXL2 checkpoint with measurement.json beside it.

A measurement can be reused for another bpw (measurement=...); one written before sensitivities were kept is
weighed again. The passes save their work beside the output as numbered steps (weighing, measuring layer i, then
quantizing layer i), so an interrupted run restarted with the same
arguments continues from the last saved step and writes the bytes an uninterrupted run would.

Memory is handled as in the GPTQ pipeline (quant/pipeline.py), with the same pieces: the float weights streamed
from the model's files a layer at a time for each pass (quant/float_source.py), the calibration activations kept
where the memory estimate's plan says (quant/activation_store.py; the weighing pass's every-layer inputs in a
store of their own, on the tier the plan picks for them), the estimate reported before the first pass and the
peaks returned, a layer's work (weighing, measuring, quantizing) and the head's (its loss gradients, its
quantization) that run out of GPU memory redone down the ladder (quant/memory_ladder.py), and the checkpoint
written shard by shard from the saved steps."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import logging
import time
from collections import ChainMap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, raise_first_error
from qtool.core.host_memory import give_back_freed_memory
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
from qtool.quant.forward_dtype import weights_in_forward_dtype
from qtool.quant.layer_quantizer import compute_context
from qtool.quant.sensitivity import LayerWeights, linear_sensitivities
from qtool.quant.activation_store import ActivationStore, open_store
from qtool.quant.float_source import open_float_model
from qtool.quant.memory_ladder import LadderRun, Rung
from qtool.quant.step_writer import StepWriter
from qtool.quant.gpu_budget import check_gpu_budget, gpu_memory_budget
from qtool.quant.pipeline import (check_activation_tier, check_against_model, estimate_line, peak_host_memory_bytes, peak_memory_bytes, source_identity,
                                  source_inputs, split_quantizable)
from qtool.quant.work_state import HiddenSaveCadence, SavedWeights, WorkState, job_fingerprint
from qtool.models.architectures import decoder_layers, get_architecture, get_module, resolve_layer_groups
from qtool.models.layerwise import BATCH_TOKENS, LayerInputs, capture_layer_inputs, iter_layer_outputs, run_layer_batch, sample_batches
from qtool.models.rules import SENSITIVITY_WINDOWS, ModelStats, resolve_compute_dtype, cpu_free_memory, device_free_memory, estimate_peak_memory, format_bytes
from qtool.checkpoints.sources import ModelSource, resolve_device, resolve_source

log = logging.getLogger(__name__)
MEASURE_P_GRID = 24  # a coarser scale search while measuring: 4x cheaper, errors ranked the same way
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
    compute_dtype: str = "float32"  # the measuring and quantizing passes' forwards (config.compute_dtype resolved)
    errors: dict[str, float] = field(default_factory=dict)  # per linear, relative output error
    choices: dict[str, str] = field(default_factory=dict)  # per linear, the candidate picked
    findings: list[Finding] = field(default_factory=list)
    vram_plan: dict[str, Any] | None = None  # with target_vram_gb: how the bpw was chosen
    # validate's estimate of peak_memory_bytes, made before the run (on the device that does the work)
    estimated_peak_memory_bytes: int = 0
    # the estimate in full (components, where the activations went) and the measured peaks of host (resident set
    # size) and device, beside whether the weights were streamed
    memory: dict[str, Any] = field(default_factory=dict)

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


def _add_samples(accumulator: HessianAccumulator, inputs: torch.Tensor) -> None:
    """One product per sample, in sample order: the Hessian is then the same however the samples are batched (the
    memory ladder's one-sample batches)."""
    inputs = inputs.detach()
    for sample in (inputs if inputs.dim() == 3 else (inputs,)):
        accumulator.add_batch(sample)


def _stored(output: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    """A layer's output as the activations are kept: float32, where its inputs are (the passes' store)."""
    return output.to(device=inputs.hidden_states[0].device, dtype=torch.float32)


def _group_hessians(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: LayerInputs, device: torch.device,
                    max_tokens: int = BATCH_TOKENS, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each group's Hessian (from its first linear's input) and the layer's outputs, in one pass over the samples;
    the forwards and Hessian products in `dtype` (the config's compute dtype; sums and outputs float32)."""
    accumulators = [HessianAccumulator(group[0][1].in_features, device=device, product_dtype=dtype) for group in groups]
    handles = [group[0][1].register_forward_pre_hook(lambda m, args, acc=acc: _add_samples(acc, args[0])) for group, acc in zip(groups, accumulators)]
    try:
        with compute_context(dtype, device):
            outputs = [_stored(out, inputs) for out in iter_layer_outputs(layer, inputs, device=device, max_tokens=max_tokens)]
    finally:
        for handle in handles:
            handle.remove()
    return [acc.hessian for acc in accumulators], outputs


class _InputTaken(Exception):
    """Raised by the hook of a one-group Hessian pass: the rest of the layer's forward is not needed."""


def _group_hessian(layer: nn.Module, group: list[tuple[str, nn.Linear]], inputs: LayerInputs, device: torch.device,
                   max_tokens: int = BATCH_TOKENS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Hessian of one group's input, each batch's forward stopped as soon as the group's first linear receives
    it (the layer's outputs come from a later pass, once every group is quantized)."""
    accumulator = HessianAccumulator(group[0][1].in_features, device=device, product_dtype=dtype)

    def take(module: nn.Module, args: tuple) -> None:
        _add_samples(accumulator, args[0])
        raise _InputTaken

    handle = group[0][1].register_forward_pre_hook(take)
    moved: dict = {}
    try:
        for samples in sample_batches(inputs, max_tokens):
            try:
                with compute_context(dtype, device):
                    run_layer_batch(layer, inputs, samples, device=device, moved=moved)
            except _InputTaken:
                pass
    finally:
        handle.remove()
    return accumulator.hessian


def measure_layer(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: LayerInputs, device: torch.device,
                  damp_percent: float, candidates=DEFAULT_CANDIDATES, max_tokens: int = BATCH_TOKENS,
                  dtype: torch.dtype = torch.float32) -> tuple[list[LinearMeasurement], list[torch.Tensor]]:
    """Every linear of one float layer measured with every candidate, and the layer's outputs (the next layer's
    inputs, where `inputs` keeps its hidden states). `groups` are the layer's quantizable linears with their full
    names; the layer's forwards run in batches of at most `max_tokens` tokens, in `dtype` (autocast)."""
    layer.to(device)
    with weights_in_forward_dtype([linear for group in groups for _, linear in group], dtype):
        hessians, outputs = _group_hessians(layer, groups, inputs, device, max_tokens, dtype)
        measurements = [
            measure_linear(name, linear.weight.data.float(), hessian, candidates, damp_percent=damp_percent, p_grid=MEASURE_P_GRID)
            for group, hessian in zip(groups, hessians)
            for name, linear in group
        ]
    layer.to("cpu")
    return measurements, outputs


def quantize_exl2_layer(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], inputs: LayerInputs, choices: dict[str, Exl2Candidate],
                        device: torch.device, damp_percent: float, refine: bool = False,
                        max_tokens: int = BATCH_TOKENS,
                        dtype: torch.dtype = torch.float32) -> tuple[dict[str, Exl2Weight], dict[str, float], list[torch.Tensor]]:
    """Quantize each chosen linear of one layer, each group's Hessian from a pass in which the groups before it
    already hold their quantized weights; returns the weights, their errors and the layer's outputs (the layer's
    weights are left changed: the caller keeps a copy to redo it)."""
    layer.to(device)
    weights, errors = {}, {}
    chosen = [[(n, m) for n, m in g if n in choices] for g in groups]
    with weights_in_forward_dtype([linear for group in chosen for _, linear in group], dtype):
        for group in chosen:
            if not group:
                continue
            hessian = _group_hessian(layer, group, inputs, device, max_tokens, dtype)
            for name, linear in group:
                bits, sizes = choices[name].layout(linear.in_features)
                result = exl2_quantize(linear.weight.data.float(), hessian, bits, sizes, damp_percent=damp_percent, refine=refine)
                weights[name], errors[name] = result.weight, result.error
                linear.weight.data = result.dequantized.to(linear.weight.dtype)  # later groups see the quantized ones
        with compute_context(dtype, device):
            outputs = [_stored(out, inputs) for out in iter_layer_outputs(layer, inputs, device=device, max_tokens=max_tokens)]
    layer.to("cpu")
    return weights, errors, outputs


def weigh_linears(model: nn.Module, layer_groups: list[list[list[tuple[str, nn.Linear]]]], windows: list[torch.Tensor],
                  device: torch.device, count: int = SENSITIVITY_WINDOWS, layer_weights: LayerWeights | None = None,
                  store: ActivationStore | None = None, progress: Progress | None = None) -> dict[str, float]:
    """Each quantizable linear's sensitivity from the first `count` calibration windows, one layer at a time on
    `device`, every layer's inputs kept by `store` (default: host memory; quant/sensitivity.py); `layer_weights`
    reads a streamed model's layer for each visit."""
    names = {name for groups in layer_groups for group in groups for name, _ in group}
    return linear_sensitivities(model, windows[:count], names=names, device=device, layer_weights=layer_weights, store=store, progress=progress)


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
    """The head quantized on `device` from the Hessian of its inputs (the final norm's outputs); the norm and head
    weights are left where they were, the result is on the CPU."""
    spec = get_architecture(model)
    norm, head = get_module(model, spec.norm_path), get_module(model, spec.head_path)
    accumulator = HessianAccumulator(head.in_features, device=device)
    home = norm.weight.device
    norm.to(device)
    try:
        with torch.no_grad():
            for hidden in inputs.hidden_states:
                accumulator.add_batch(norm(hidden.to(device)))
    finally:
        norm.to(home)
    bits, sizes = HEAD_CANDIDATES[head_bits].layout(head.in_features)
    result = exl2_quantize(head.weight.data.to(device), accumulator.hessian, bits, sizes, refine=refine)
    weight = result.weight
    cpu_weight = dataclasses.replace(weight, codes=weight.codes.cpu(), qscale=weight.qscale.cpu(), scale_max=weight.scale_max.cpu(), perm=weight.perm.cpu())
    return spec.head_path, cpu_weight, result.error


def _plan_for_vram(model: nn.Module, layer_groups: list[list[list[tuple[str, nn.Linear]]]], config: QuantConfig) -> VramPlan:
    """The bpw at which this model fits config.target_vram_gb: every tensor but the quantized decoder linears
    counts as float16 (tied tensors once), a quantized head at its candidate's bits."""
    spec = get_architecture(model)
    quantized = {name for groups in layer_groups for group in groups for name, _ in group}
    head = get_module(model, spec.head_path)
    seen, fixed_bytes = set(), 0
    for name, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            # tied tensors are one Parameter (a streamed model's are on meta, where every data_ptr is 0)
            if name in quantized or id(param) in seen or (config.head_bits and module is head):
                continue
            seen.add(id(param))
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
    streaming: bool | None = None,
    activation_tier: str | None = None,
    gpu_memory_bytes: int | None = None,
) -> Exl2QuantizeResult:
    """Quantize a float model to EXL2 at config.bpw (the head at config.head_bits: 0 = float16, 6 or 8), reusing
    `measurement` (an earlier run's measurement.json) when given. Work is saved beside the output after every
    step and resumed by the next run with the same arguments (unless `discard_resume`); the output is locked
    against other runs until the checkpoint is written, shard by shard (at most `max_shard_size_bytes` each).

    As quantize_model: `streaming` (None: wherever the source allows) reads each decoder layer's weights from the
    model's files for each pass over it and drops them after; `activation_tier` (device, host or disk; None: the
    memory estimate's plan) says where the calibration activations wait between layers; the memory estimate is
    reported before the first pass, the measured peaks returned; out of GPU memory inside a layer, that layer is
    redone lower down the memory ladder; `gpu_memory_bytes` holds the run to that much GPU memory
    (qtool.quant.gpu_budget). None of these changes a byte of the checkpoint."""
    started = time.perf_counter()
    check_output_path(output)  # a refused path fails before a Hub model is fetched
    if config.output_format != "exl2":
        raise QtoolError(f"output_format {config.output_format!r} is not written by the EXL2 pipeline", "use output_format exl2 (--format exl2)")
    if activation_tier is not None:
        check_activation_tier(activation_tier)
    findings = raise_first_error(validate_config(config))
    reused, measurement_digest = _read_measurement(measurement)
    compute = resolve_device(device)
    check_gpu_budget(gpu_memory_bytes, compute)
    source = resolve_source(model_spec)
    with (claimed_output(output, force, source_inputs(source, config.calibration.source, measurement)) as output,
          gpu_memory_budget(compute, gpu_memory_bytes)):
        return _quantize_exl2(model_spec, source, config, output, reused, measurement, measurement_digest, compute, force, progress,
                              discard_resume, findings, started, max_shard_size_bytes, streaming, activation_tier)


def _quantize_exl2(model_spec: str | Path, source: ModelSource, config: QuantConfig, output: Path, reused, measurement, measurement_digest: str | None,
                   compute: torch.device, force: bool, progress: Progress | None, discard_resume: bool, findings: list,
                   started: float, max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES, streaming: bool | None = None,
                   activation_tier: str | None = None) -> Exl2QuantizeResult:
    report = progress or (lambda done, total, detail="": None)
    # The float model stays on the CPU in float32 (streamed: one decoder layer of it at a time, read again for each pass)
    float_model = open_float_model(source, str(model_spec), streaming=streaming)
    model, tokenizer, spec = float_model.model, float_model.tokenizer, float_model.spec
    if tokenizer is None:
        raise QtoolError(f"model {model_spec} has no tokenizer", "calibration text must be tokenized: add the tokenizer files")
    layers = decoder_layers(model, spec)
    num_layers = len(layers)
    is_streamed = float_model.streamed is not None
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
    weigh_steps = 0 if reused is not None and weighed(reused) else 1
    # the free memory read once: the rule below and the plan the run follows judge the same figures
    free = {"cpu_free_bytes": cpu_free_memory(), "device_free_bytes": device_free_memory(compute)}
    findings += check_against_model(config, model, spec, compute, streaming=is_streamed, weighing=bool(weigh_steps), **free)
    plan = _plan_for_vram(model, layer_groups, config) if config.target_vram_gb else None
    if plan is not None:
        config = dataclasses.replace(config, bpw=plan.bpw)
        log.info("--target-vram: %s", plan.describe())

    measure_steps = 0 if reused is not None else num_layers
    first_measure, first_quantize = weigh_steps, weigh_steps + measure_steps
    total_steps = first_quantize + num_layers
    # the estimate validate's memory rule judged, said before the work starts and returned beside the measured peaks
    estimate = estimate_peak_memory(config, ModelStats.from_config(model.config), compute, streaming=is_streamed, tier=activation_tier,
                                    weighing=bool(weigh_steps), **free)
    estimated_peak = estimate["device_bytes"] if compute.type == "cuda" else estimate["cpu_bytes"]
    report(0, total_steps, estimate_line(estimate, compute))
    log.info("%s (%s)", estimate_line(estimate, compute), ", ".join(f"{name} {format_bytes(size)}" for name, size in estimate["components"].items()))

    calibration = config.calibration
    windows = calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seqlen, calibration.seed)
    calibration_tokens = sum(w.numel() for w in windows)
    hidden_size = getattr(model.config, "hidden_size", None)

    def rung_dtype(rung: Rung) -> torch.dtype:  # the measuring and quantizing passes' forwards (the weighing's float32)
        return resolve_compute_dtype(config.compute_dtype, rung.compute, hidden_size)

    compute_dtype = resolve_compute_dtype(config.compute_dtype, compute, hidden_size)  # on the planned rung

    fingerprint = job_fingerprint({
        "format": "exl2", "config": config.to_dict(), "model": source_identity(source), "measurement": measurement_digest,
        "qtool": qtool_version(), "torch": torch.__version__, "device": compute.type,
        "compute_dtype": str(compute_dtype),
    })
    state = WorkState.open(output, fingerprint, discard=discard_resume)
    resumed_from = state.completed_layers
    with open_store(estimate["activation_tier"], compute, output, estimate["disk_bytes"]) as store, StepWriter() as writer:
        if weigh_steps and resumed_from == 0:
            report(0, total_steps, "weighing the linears (forward and backward passes)")
            # every layer's inputs wait for the backward pass, in a store of their own on the tier the plan picked
            # for them (its folder on disk removed when the pass is done)
            weighing_disk = (estimate["weighing_peaks"] or {}).get("disk_bytes", 0)
            with open_store(estimate["weighing_tier"], compute, output, weighing_disk) as weighing_store:
                sensitivities = weigh_linears(model, layer_groups, windows, compute, layer_weights=float_model.layer_in_memory,
                                              store=weighing_store, progress=lambda done, total, detail="": report(0, total_steps, detail))
            state.save_step(0, {}, {"sensitivity": json.dumps(sensitivities)}, [])
            give_back_freed_memory()  # every layer's inputs

        def first_inputs() -> LayerInputs:
            """Layer 0's inputs, as the store keeps them (captured again for the second pass rather than held through
            the first: the embeddings give the same values)."""
            captured = capture_layer_inputs(model, windows, device="cpu", storage_device="cpu", spec=spec)
            return LayerInputs(0, run.keep(captured.hidden_states), captured.calls)

        report(weigh_steps, total_steps, "capturing calibration inputs")
        run = _LayerRun(store, compute)
        run.inputs = first_inputs()
        cadence = HiddenSaveCadence()  # which steps are resume points (large hidden states are not saved every step)
        if resumed_from not in (0, first_measure, first_quantize):  # the saved hidden states feed the next step
            log.info("resuming %s after step %d of %d", output, resumed_from, total_steps)
            layer = resumed_from - first_measure if resumed_from < first_quantize else resumed_from - first_quantize
            run.inputs = LayerInputs(layer, run.keep(state.load_hidden()), run.inputs.calls)
        for step in range(max(resumed_from, first_measure), first_quantize):
            index = step - first_measure
            what = f"measuring layer {index + 1}/{num_layers}"
            report(step, total_steps, what)
            with float_model.layer_in_memory(index, read_next=True):
                measured, outputs = run.climb(what, lambda rung, inputs, index=index: measure_layer(
                    layers[index], layer_groups[index], inputs, rung.compute, config.damp_percent, max_tokens=rung.max_batch_tokens or config.calibration.batch_tokens or BATCH_TOKENS,
                    dtype=rung_dtype(rung)),
                    restore=lambda index=index: layers[index].to("cpu"))
                outputs = run.keep(outputs)
                cadence.save(index, num_layers, outputs,
                             lambda hidden, step=step, result=_measurement_step(measured): state.save_step(step, *result, hidden),
                             writer=writer)
            run.advance(outputs)
        writer.wait()  # the measured steps are read back next
        measurements = reused if reused is not None else [m for step in range(first_measure, first_quantize) for m in _measurements_of_step(state.step_metadata(step))]
        if weigh_steps:
            measurements = with_sensitivities(measurements, json.loads(state.step_metadata(0)["sensitivity"]))
        if plan is not None:  # the budget's bpw, within what the candidates can reach
            low, high = reachable_bpw(measurements)
            if plan.bpw < low:
                raise QtoolError(f"--target-vram {config.target_vram_gb:g} GB leaves {plan.bpw:.2f} bpw, below the least the candidates reach ({low:.2f})", "raise --target-vram or lower --context-length")
            config = dataclasses.replace(config, bpw=round(min(plan.bpw, high), 2))
        allocation = optimize(measurements, config.bpw)

        if resumed_from < first_quantize:  # the quantization pass starts again from the embeddings' outputs
            run.inputs = None  # the measurement pass's last outputs are not needed
            run.inputs = first_inputs()
        for step in range(max(resumed_from, first_quantize), total_steps):
            index = step - first_quantize
            what = f"quantizing layer {index + 1}/{num_layers}"
            report(step, total_steps, what)
            with float_model.layer_in_memory(index, read_next=True):
                original = {name: tensor.detach().clone() for name, tensor in layers[index].state_dict().items()}

                def restore(index: int = index, original: dict = original) -> None:
                    layers[index].load_state_dict(original)  # the groups solved so far changed the weights
                    layers[index].to("cpu")

                weights, errors, outputs = run.climb(what, lambda rung, inputs, index=index: quantize_exl2_layer(
                    layers[index], layer_groups[index], inputs, allocation.choices, rung.compute, config.damp_percent,
                    refine=config.refine_scales, max_tokens=rung.max_batch_tokens or config.calibration.batch_tokens or BATCH_TOKENS, dtype=rung_dtype(rung)), restore)
                del original, restore
                outputs = run.keep(outputs)
                result = _weights_step(weights, errors)
                # (bound now: the save may run on the writer's thread after this loop has moved on)
                cadence.save(index, num_layers, outputs,
                             lambda hidden, step=step, result=result: state.save_step(step, *result, hidden), writer=writer)
            del weights
            run.advance(outputs)
        host_peak = peak_host_memory_bytes()
        peak = peak_memory_bytes(compute)

        writer.wait()  # every step saved before the checkpoint reads them
        # Every layer's weights come from the saved state (read one step at a time while the checkpoint is written),
        # so a resumed run writes what an uninterrupted one would.
        saved = SavedWeights(state, range(first_quantize, total_steps), lambda step: _weights_of_step(*state.load_step(step))[0])
        errors = {name: json.loads(text)["error"] for step in range(first_quantize, total_steps) for name, text in state.step_metadata(step).items()}
        if not saved:
            raise QtoolError(f"no linear of {model_spec} can be stored in EXL2", "EXL2 needs input widths that are multiples of 32")
        head: dict[str, Exl2Weight] = {}
        if config.head_bits:
            what = "quantizing the head"
            report(total_steps, total_steps, what)
            # down the ladder as a layer is, less the rung of smaller batches (the head's Hessian is taken a window
            # at a time already); its weights are not changed, so there is nothing to restore but the norm's place
            name, weight, error = run.climb(what, lambda rung, inputs: _quantize_head(model, inputs, config.head_bits, rung.compute,
                                                                                      refine=config.refine_scales), restore=lambda: None, batched=False)
            head[name], errors[name] = weight, error
    report(total_steps, total_steps, "writing checkpoint")
    meta = {"model": str(model_spec), "calibration": asdict(calibration)}
    save_exl2_model(output, model, ChainMap(head, saved), _checkpoint_config(config, calibration_tokens, allocation.bits_per_weight), tokenizer,
                    measurement=measurement_to_dict(measurements, meta), max_shard_size_bytes=max_shard_size_bytes, force=force,
                    float_tensor=float_model.streamed.float_tensor if is_streamed else None)
    state.remove()
    log.info("wrote %s with %s", output, MEASUREMENT_FILE)
    host_peak = max(host_peak, peak_host_memory_bytes())  # the write itself may be the host's peak (one shard's tensors)
    if compute.type == "cpu":
        peak = max(peak, host_peak)
    memory = {"estimate": estimate, "peak_host_bytes": host_peak, "peak_device_bytes": peak if compute.type == "cuda" else 0}
    return Exl2QuantizeResult(
        output=str(output),
        config=config,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        bits_per_weight=allocation.bits_per_weight,
        measured=reused is None,
        weighed=bool(weigh_steps),
        layers=num_layers,
        quantized_linears=len(saved) + len(head),
        skipped_linears=skipped,
        resumed_from_step=resumed_from,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=peak,
        device=str(compute),
        calibration_tokens=calibration_tokens,
        errors=errors,
        choices={name: candidate.describe() for name, candidate in allocation.choices.items()},
        findings=findings,
        vram_plan=None if plan is None else plan.to_dict(),
        estimated_peak_memory_bytes=estimated_peak,
        memory=memory,
    )


class _LayerRun:
    """The calibration activations between layers (kept by an activation store) and where the run stands on the
    memory ladder: out of GPU memory inside a layer, the layer is redone on the next rung, and the run stays there
    (activations moved to host memory for good when the rung says so)."""

    def __init__(self, store: ActivationStore, compute: torch.device):
        self.inputs: LayerInputs | None = None
        self.ladder = LadderRun(store, compute, self._rehome)

    @property
    def store(self) -> ActivationStore:
        return self.ladder.store

    def _rehome(self, store: ActivationStore) -> None:
        self.inputs = LayerInputs(self.inputs.layer_index, store.store(self.inputs.hidden_states), self.inputs.calls)

    def climb(self, what: str, work: Callable[[Rung, LayerInputs], Any], restore: Callable[[], None], batched: bool = True) -> Any:
        return self.ladder.climb(what, lambda rung: work(rung, self.inputs), restore, batched)

    def keep(self, outputs) -> list[torch.Tensor]:
        """A layer's outputs as the store keeps them."""
        return list(self.store.store(outputs))

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The next layer's inputs are these outputs; what the layer's work freed goes back to the system."""
        self.inputs = self.inputs.advanced(outputs)
        give_back_freed_memory()
