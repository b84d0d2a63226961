"""`qtool validate` on config.json against the stored tensors: the loaders' own checks (checkpoints/) as findings,
so that validate and eval/convert/run/quantize say the same words: config sizes that contradict the stored shapes,
and tensors the model class expects that the files lack."""

from __future__ import annotations

from typing import Any

from qtool.checkpoints.config_shapes import config_shape_error
from qtool.checkpoints.expected_tensors import expected_tensor_shapes, meta_model, missing_tensor_names, missing_tensors_error
from qtool.core.findings import Finding
from qtool.formats.safetensors_header import TensorHeader
from qtool.validate.report import finding_from_error

CONFIG_WHERE = "config.json"


def transformers_config(hf_config: dict[str, Any] | None) -> Any:
    """config.json as a transformers config object (attribute names resolved), or None."""
    if not hf_config or "model_type" not in hf_config:
        return None
    from transformers import AutoConfig

    from huggingface_hub.errors import StrictDataclassError

    fields = dict(hf_config)
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError, TypeError, AttributeError, StrictDataclassError):  # a field of the wrong type or value
        return None


def model_tensor_findings(hf_config: dict[str, Any] | None, tensors: dict[str, TensorHeader], check_missing: bool) -> list[Finding]:
    """Findings for config.json's sizes against the stored shapes and, with check_missing (float models: a
    quantized checkpoint's loader checks its own tensors), for expected tensors the files lack. Nothing when
    transformers cannot build the model class of the config (other findings say why)."""
    config = transformers_config(hf_config)
    model = meta_model(config) if config is not None and tensors else None
    if model is None:
        return []
    findings = []
    stored = {name: tensor.shape for name, tensor in tensors.items()}
    problem = config_shape_error(config, expected_tensor_shapes(model), stored, {name: tensor.file for name, tensor in tensors.items()})
    if problem is not None:
        findings.append(finding_from_error(problem, CONFIG_WHERE))
    missing = missing_tensor_names(model, tensors) if check_missing else None
    if missing:
        problem = missing_tensors_error(type(model).__name__, missing)
        findings.append(finding_from_error(problem, sorted(missing)[0]))
    return findings
