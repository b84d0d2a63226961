"""`qtool validate` on a float model directory: no quantized tensors without a quantization_config, every tensor
the model class expects present, config.json's sizes matching the tensors, and with --config the config's rules
against the model's linears and the device's memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.checkpoints.sources import resolve_device
from qtool.checkpoints.undeclared_quantization import undeclared_quantization_errors
from qtool.config.schema import validate_config
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, info, warning
from qtool.formats.safetensors_header import TensorHeader
from qtool.models.architectures import get_architecture
from qtool.models.rules import (LAYER_INDEX, ModelStats, cpu_free_memory, device_free_memory, estimate_peak_memory, validate_for_hardware,
                               validate_for_model)
from qtool.validate.config_file import read_config
from qtool.validate.model_tensors import CONFIG_WHERE, model_tensor_findings, transformers_config
from qtool.validate.report import ValidationReport, finding_from_error

LINEAR_SUFFIX = ".weight"


def linear_shapes_from_headers(tensors: dict[str, TensorHeader], model_config: Any = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the linears a quantization run visits: with a model config of a type in the
    architecture table, its sequential groups in every decoder layer; otherwise every 2-D weight inside a numbered
    block. Embeddings and the LM head sit outside the blocks and stay float."""
    spec = None
    if model_config is not None:
        try:
            spec = get_architecture(model_config)
        except QtoolError:
            spec = None
    if spec is not None:
        members = [m for group in spec.groups_for(model_config) for m in group if m not in spec.excluded_linears]
        layer_count = int(model_config.get_text_config().num_hidden_layers)
        names = [f"{spec.layers_path}.{i}.{m}" for i in range(layer_count) for m in members]
        headers = {name: tensors.get(name + LINEAR_SUFFIX) for name in names}
        return {name: (t.shape[1], t.shape[0]) for name, t in headers.items() if t is not None and len(t.shape) == 2}
    shapes = {}
    for name, tensor in tensors.items():
        if name.endswith(LINEAR_SUFFIX) and len(tensor.shape) == 2 and LAYER_INDEX.search(name):
            shapes[name.removesuffix(LINEAR_SUFFIX)] = (tensor.shape[1], tensor.shape[0])
    return shapes


def float_model_report(path: Path, hf_config: dict[str, Any] | None, tensors: dict[str, TensorHeader], findings: list[Finding],
                        summary: dict[str, Any], config_file: str | Path | None, device: str) -> ValidationReport:
    report = ValidationReport("float_model", str(path), findings, summary)
    report.findings += [finding_from_error(problem, CONFIG_WHERE) for problem in undeclared_quantization_errors(tensors)]
    report.findings += model_tensor_findings(hf_config, tensors, check_missing=True)
    dtypes = ", ".join(f"{d} ×{n}" for d, n in sorted(summary["dtypes"].items()))
    report.findings.append(info(
        "summary",
        f"float model: {summary['tensors']} tensors, {summary['params']:,} parameters in {summary['files']} file(s) ({dtypes or 'no tensors'})",
    ))
    if config_file is not None:
        report.findings += model_aware_findings(path, hf_config, tensors, config_file, device, report.summary)
    return report


def model_aware_findings(path: Path, hf_config: dict[str, Any] | None, tensors: dict[str, TensorHeader],
                          config_file: str | Path, device: str, summary: dict[str, Any]) -> list[Finding]:
    """The config's own rules, then its group size against the model's linears, then memory on the device."""
    config, findings = read_config(config_file)
    if config is None:
        return findings
    findings = validate_config(config)
    model_config = transformers_config(hf_config)
    shapes = linear_shapes_from_headers(tensors, model_config)
    findings += validate_for_model(config, shapes)
    summary["linears"] = len(shapes)
    if model_config is None:
        findings.append(warning("config.json", "cannot be read as a transformers config: the memory check is skipped", "check model_type and the model's fields"))
        return findings
    try:
        stats = ModelStats.from_config(model_config, {n: t.shape for n, t in tensors.items()})
    except (AttributeError, TypeError, ValueError) as exc:
        findings.append(warning("config.json", f"cannot estimate memory: {str(exc).splitlines()[0]}", "the memory check is skipped"))
        return findings
    torch_device = resolve_device(device)
    # quantize streams a local safetensors directory's weights layer by layer (qtool.quant.float_source)
    free = {"cpu_free_bytes": cpu_free_memory(), "device_free_bytes": device_free_memory(torch_device)}
    findings += validate_for_hardware(config, stats, torch_device, streaming=True, **free)
    summary["memory_estimate"] = estimate_peak_memory(config, stats, torch_device, streaming=True, **free)
    return findings
