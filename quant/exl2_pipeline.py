"""EXL2 quantization of a whole model as a library call: a measurement pass (every linear of every layer with
every candidate, on the float model's calibration activations), the optimizer's pick per linear for a target
bpw, then a quantization pass layer by layer (each layer's inputs from the layers already quantized, each group
of linears seeing the groups quantized before it) and the EXL2 checkpoint with measurement.json beside it.

A measurement can be reused for another bpw (measurement=...). Not yet here: resuming an interrupted run, and
keeping activations off the compute device; the shared GPTQ pipeline (quant/pipeline.py) has both and is the
place this should move into."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.configs.errors import QtoolError
from qtool.convert.exl2_checkpoint import MEASUREMENT_FILE, save_exl2_model
from qtool.convert.exl2_format import Exl2Weight, check_exl2_layout
from qtool.eval.datasets import calibration_windows
from qtool.quant.exl2_optimize import DEFAULT_CANDIDATES, HEAD_CANDIDATES, LinearMeasurement, measure_linear, measurement_from_dict, measurement_to_dict, optimize
from qtool.quant.exl2_solver import Exl2Candidate, exl2_quantize
from qtool.quant.hessian import HessianAccumulator
from qtool.runtime.architectures import decoder_layers, get_architecture, get_module, resolve_layer_groups
from qtool.runtime.layerwise import LayerInputs, capture_layer_inputs, iter_layer_outputs
from qtool.runtime.sources import load_model, resolve_device

log = logging.getLogger(__name__)
MEASURE_P_GRID = 24  # a coarser scale search while measuring: 4x cheaper, errors ranked the same way
Progress = Callable[[int, int, str], None]


@dataclass
class Exl2QuantizeResult:
    output: str
    target_bpw: float
    bits_per_weight: float  # of the decoder linears, as ExLlamaV2 counts (head excluded)
    head_bits: int
    measured: bool  # False when a given measurement was reused
    skipped: dict[str, str]
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)  # per linear, relative output error

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _quantizable(groups: list[list[tuple[str, nn.Linear]]], skipped: dict[str, str]) -> list[list[tuple[str, nn.Linear]]]:
    kept = []
    for group in groups:
        ok = []
        for name, linear in group:
            try:
                check_exl2_layout(linear.in_features, linear.out_features, (8,), (linear.in_features,), name)
            except QtoolError as exc:
                skipped[name] = exc.message
                continue
            ok.append((name, linear))
        if ok:
            kept.append(ok)
    return kept


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


def measure_model(model: nn.Module, inputs: LayerInputs, device: torch.device, candidates=DEFAULT_CANDIDATES, progress: Progress | None = None) -> tuple[list[LinearMeasurement], dict[str, str]]:
    """Every quantizable decoder linear measured with every candidate, on the float model's activations."""
    spec = get_architecture(model)
    layers = decoder_layers(model, spec)
    measurements, skipped = [], {}
    for index, layer in enumerate(layers):
        (progress or (lambda *a: None))(index, len(layers), f"measuring layer {index + 1}/{len(layers)}")
        layer.to(device)
        groups = _quantizable(resolve_layer_groups(model, index, spec), skipped)
        hessians, outputs = _group_hessians(layer, groups, inputs, device)
        for group, hessian in zip(groups, hessians):
            for name, linear in group:
                measurements.append(measure_linear(name, linear.weight.data, hessian, candidates, p_grid=MEASURE_P_GRID))
        layer.to("cpu")
        inputs = inputs.advanced(outputs)
    return measurements, skipped


def quantize_layers(model: nn.Module, inputs: LayerInputs, choices: dict[str, Exl2Candidate], device: torch.device, progress: Progress | None = None) -> tuple[dict[str, Exl2Weight], dict[str, float], LayerInputs]:
    """Quantize each chosen linear, layer by layer: a layer's inputs come from the layers already quantized, and
    each group's Hessian from a pass in which the groups before it already hold their quantized weights."""
    spec = get_architecture(model)
    layers = decoder_layers(model, spec)
    weights, errors = {}, {}
    for index, layer in enumerate(layers):
        (progress or (lambda *a: None))(index, len(layers), f"quantizing layer {index + 1}/{len(layers)}")
        layer.to(device)
        groups = [[(n, m) for n, m in group if n in choices] for group in resolve_layer_groups(model, index, spec)]
        for group in [g for g in groups if g]:
            (hessian,), _ = _group_hessians(layer, [group], inputs, device)
            for name, linear in group:
                bits, sizes = choices[name].layout(linear.in_features)
                result = exl2_quantize(linear.weight.data, hessian, bits, sizes)
                weights[name], errors[name] = result.weight, result.error
                linear.weight.data = result.dequantized.to(linear.weight.dtype)  # later groups see the quantized ones
        outputs = [out.to(inputs.hidden_states[0].device) for out in iter_layer_outputs(layer, inputs, device=device)]
        layer.to("cpu")
        inputs = inputs.advanced(outputs)
    return weights, errors, inputs


def _quantize_head(model: nn.Module, inputs: LayerInputs, head_bits: int, device: torch.device) -> tuple[str, Exl2Weight, float]:
    spec = get_architecture(model)
    norm, head = get_module(model, spec.norm_path), get_module(model, spec.head_path)
    accumulator = HessianAccumulator(head.in_features, device=device)
    norm.to(device)
    with torch.no_grad():
        for hidden in inputs.hidden_states:
            accumulator.add_batch(norm(hidden.to(device)))
    norm.to("cpu")
    bits, sizes = HEAD_CANDIDATES[head_bits].layout(head.in_features)
    result = exl2_quantize(head.weight.data, accumulator.hessian, bits, sizes)
    return spec.head_path, result.weight, result.error


def quantize_model_exl2(
    model_spec: str | Path,
    output: str | Path,
    target_bpw: float,
    head_bits: int = 0,
    calibration: str | Path = "wikitext",
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    measurement: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> Exl2QuantizeResult:
    """Quantize a float model to EXL2 at target_bpw (2.0..8.0; the head at head_bits 0 = float16, 6 or 8)."""
    started = time.perf_counter()
    output = Path(output)
    if output.exists() and not force:
        raise QtoolError(f"output {output} already exists", "pass --force to replace it, or choose another output path")
    if not 2.0 <= target_bpw <= 8.0:
        raise QtoolError(f"--bpw {target_bpw} is out of range", "EXL2 targets run from 2.0 to 8.0 bits per weight")
    if head_bits not in (0, *HEAD_CANDIDATES):
        raise QtoolError(f"--head-bits {head_bits} is not supported", f"use 0 (keep float16) or one of {', '.join(map(str, HEAD_CANDIDATES))}")
    reused = None
    if measurement is not None:
        path = Path(measurement)
        try:
            reused = measurement_from_dict(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise QtoolError(f"cannot read the measurement {path}: {exc}", "pass the measurement.json of an earlier run of this model") from exc
    compute = resolve_device(device)
    loaded = load_model(model_spec, device="cpu", dtype="float32")
    if loaded.quantization_config:
        raise QtoolError(f"model {model_spec} is already quantized", "quantize a float model")
    if loaded.tokenizer is None:
        raise QtoolError(f"model {model_spec} has no tokenizer", "calibration text must be tokenized: add the tokenizer files")
    model = loaded.model
    windows = calibration_windows(loaded.tokenizer, calibration, samples, seqlen, seed)
    spec = get_architecture(model)
    inputs = capture_layer_inputs(model, windows, device="cpu", storage_device="cpu", spec=spec)
    skipped: dict[str, str] = {}
    if reused is None:
        measurements, skipped = measure_model(model, inputs, compute, progress=progress)
    else:
        measurements = reused
        names = {name for name, _ in model.named_modules()}
        unknown = [m.name for m in measurements if m.name not in names]
        if unknown:
            raise QtoolError(f"the measurement names linears this model lacks: {', '.join(unknown[:3])}", "measure this model (omit --measurement)")
    allocation = optimize(measurements, target_bpw)
    weights, errors, last = quantize_layers(model, inputs, allocation.choices, compute, progress)
    if head_bits:
        name, weight, error = _quantize_head(model, last, head_bits, compute)
        weights[name], errors[name] = weight, error
    meta = {"model": str(model_spec), "calibration": {"dataset": str(calibration), "rows": samples, "length": seqlen, "seed": seed}}
    config = {"bits": target_bpw, "head_bits": head_bits, "calibration": {"rows": samples, "length": seqlen, "dataset": Path(str(calibration)).name}}
    save_exl2_model(output, model, weights, config, loaded.tokenizer, measurement=measurement_to_dict(measurements, meta), force=force)
    log.info("wrote %s with %s", output, MEASUREMENT_FILE)
    return Exl2QuantizeResult(
        output=str(output),
        target_bpw=target_bpw,
        bits_per_weight=allocation.bits_per_weight,
        head_bits=head_bits,
        measured=reused is None,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        errors=errors,
    )
