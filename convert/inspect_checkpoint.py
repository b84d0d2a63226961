"""What `qtool validate` checks: a config file (schema), a GPTQ checkpoint directory (config, safetensors headers,
shard index, GPTQ tensors) or a float model directory (headers, and with a config the model-aware rules)."""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.configs.errors import QtoolError
from qtool.configs.findings import Finding, error, has_errors, info, warning
from qtool.configs.model_rules import LAYER_INDEX, ModelStats, estimate_peak_memory, validate_for_hardware, validate_for_model
from qtool.configs.schema import CONFIG_SUFFIXES, PRESETS_DIR, QuantConfig, config_from_dict, preset_names, read_config_file, validate_config
from qtool.convert.gptq_checks import LayerSettings, check_gptq_tensors, group_gptq_tensors
from qtool.convert.gptq_config import parse_gptq_config
from qtool.convert.safetensors_header import INDEX_NAME, TensorHeader, read_checkpoint_headers
from qtool.runtime.architectures import get_architecture
from qtool.runtime.sources import resolve_device

# quantization_config keys that map onto QuantConfig fields; the others (tool versions, paths) are not checked.
QUANT_KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential", "damp_percent", "checkpoint_format")
REQUIRED_QUANT_KEYS = ("bits", "group_size")
LEGACY_QUANT_FILE = "quantize_config.json"
LINEAR_SUFFIX = ".weight"


@dataclass
class ValidationReport:
    kind: str  # "config", "checkpoint" or "float_model"
    path: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not has_errors(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "findings": [f.to_dict() for f in self.findings], "summary": self.summary}


def _finding_from_error(exc: QtoolError, where: str) -> Finding:
    """A QtoolError of the config reader as a finding; its message starts with `where`, which is dropped."""
    message = exc.message.removeprefix(where).lstrip(":. ") if exc.message.startswith(where) else exc.message
    return error(where, message, exc.hint or "")


def validate_path(path: str | Path, config_file: str | Path | None = None, device: str = "auto") -> ValidationReport:
    """Validate a config file or preset name, or a model directory (quantized or float). Raises QtoolError when
    PATH is neither."""
    path = Path(path)
    if path.is_dir():
        return _validate_directory(path, config_file, device)
    if path.is_file() and path.suffix not in CONFIG_SUFFIXES:
        raise QtoolError(f"{path} is neither a config file nor a model directory", "pass a .yaml/.json/.toml config, a preset name, or a checkpoint directory")
    if path.exists() or path.suffix in CONFIG_SUFFIXES or (PRESETS_DIR / f"{path.name}.yaml").exists():
        return _validate_config_file(path)
    close = difflib.get_close_matches(path.name, preset_names(), n=1)
    guess = f"did you mean the preset '{close[0]}'? " if close else ""
    raise QtoolError(f"{path} does not exist", f"{guess}pass a model directory, a config file or a preset: {', '.join(preset_names())}")


def _read_config(path: str | Path) -> tuple[QuantConfig | None, list[Finding]]:
    """A config file or preset; what is wrong inside it becomes a finding, a file that is not there raises."""
    path = Path(path)
    if not path.exists() and not (path.suffix == "" and (PRESETS_DIR / f"{path.name}.yaml").exists()):
        read_config_file(path)  # raises its "does not exist", with a did-you-mean for presets
    try:
        return read_config_file(path), []
    except QtoolError as exc:
        return None, [_finding_from_error(exc, str(path))]


def _validate_config_file(path: Path) -> ValidationReport:
    config, findings = _read_config(path)
    if config is None:
        return ValidationReport("config", str(path), findings)
    return ValidationReport("config", str(path), validate_config(config), config.to_dict())


def _read_json(path: Path) -> tuple[Any, list[Finding]]:
    try:
        return json.loads(path.read_text()), []
    except json.JSONDecodeError as exc:
        return None, [error(path.name, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "restore or re-create the file")]


def check_quantization_config(data: Any, where: str) -> tuple[QuantConfig | None, list[Finding]]:
    """Check a checkpoint's quantization_config with the same choices and rules as qtool's own config; return it
    as a QuantConfig when it is usable for the tensor checks."""
    if not isinstance(data, dict):
        return None, [error(where, f"must be a JSON object, got {type(data).__name__}", "restore or re-create it")]
    found: list[Finding] = []
    method = data.get("quant_method")
    if method is None:
        found.append(error(f"{where}.quant_method", "is missing", 'add "quant_method": "gptq"'))
    elif method != "gptq":
        return None, [error(f"{where}.quant_method", f"{method!r} is not supported", "qtool validates GPTQ checkpoints (quant_method gptq)")]
    values = {key: data[key] for key in QUANT_KEYS if key in data}
    if "checkpoint_format" not in values and "format" in data:  # GPTQModel's in-memory name for the same key
        values["checkpoint_format"] = data["format"]
    usable: dict[str, Any] = {}
    for key, value in values.items():
        try:
            config_from_dict({key: value}, where=where)
            usable[key] = value
        except QtoolError as exc:
            found.append(_finding_from_error(exc, f"{where}.{key}"))
    for key in REQUIRED_QUANT_KEYS:
        if key not in data:
            found.append(error(f"{where}.{key}", "is missing", f"add \"{key}\" with the value the checkpoint was quantized with"))
    config = config_from_dict(usable, where=where)
    rule_findings = [f for f in validate_config(config) if f.level.value != "info"]
    found += [dataclasses.replace(f, where=f"{where}.{f.where}") for f in rule_findings]
    if has_errors(found):
        return None, found
    return config, found


def _compare_quant_files(main: dict[str, Any], legacy: dict[str, Any]) -> list[Finding]:
    found = []
    for key in ("quant_method", *QUANT_KEYS):
        if key in main and key in legacy and main[key] != legacy[key]:
            found.append(error(
                f"{LEGACY_QUANT_FILE}:{key}",
                f"is {legacy[key]!r} but config.json says {main[key]!r}",
                "make the two files agree (loaders read config.json first)",
            ))
    return found


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


@dataclass
class _DirectoryConfigs:
    """What the JSON files of a model directory say: the model config and the quantization config (and where
    it came from)."""

    hf_config: dict[str, Any] | None = None
    quant_data: Any = None
    quant_where: str = ""
    findings: list[Finding] = field(default_factory=list)


def _read_directory_configs(path: Path) -> _DirectoryConfigs:
    read = _DirectoryConfigs()
    if (path / "config.json").exists():
        read.hf_config, read.findings = _read_json(path / "config.json")
        if read.hf_config is not None and not isinstance(read.hf_config, dict):
            read.findings.append(error("config.json", "must be a JSON object", "restore or re-create the file"))
            read.hf_config = None
    else:
        read.findings.append(error("config.json", "is missing", "copy the model's config.json into the directory"))
    legacy = None
    if (path / LEGACY_QUANT_FILE).exists():
        legacy, legacy_findings = _read_json(path / LEGACY_QUANT_FILE)
        read.findings += legacy_findings
    if read.hf_config is not None and "quantization_config" in read.hf_config:
        read.quant_data, read.quant_where = read.hf_config["quantization_config"], "config.json:quantization_config"
        if isinstance(legacy, dict) and isinstance(read.quant_data, dict):
            read.findings += _compare_quant_files(read.quant_data, legacy)
    elif isinstance(legacy, dict):  # older AutoGPTQ: no quant_method, and only this file
        read.quant_data, read.quant_where = {"quant_method": "gptq", **legacy}, LEGACY_QUANT_FILE
    return read


def _dynamic_settings(quant_data: Any, where: str) -> tuple[LayerSettings | None, list[Finding]]:
    """Per-module bits and group size from GPTQModel's `dynamic` overrides, read as qtool's loader reads them."""
    if not isinstance(quant_data, dict) or not quant_data.get("dynamic"):
        return None, []
    try:
        parsed = parse_gptq_config(quant_data, where)
    except QtoolError as exc:
        return None, [error(f"{where}.dynamic", exc.message, exc.hint or "")]
    return (parsed.settings_for if parsed is not None else None), []


def _validate_directory(path: Path, config_file: str | Path | None, device: str) -> ValidationReport:
    has_model_files = any((path / n).exists() for n in ("config.json", LEGACY_QUANT_FILE, INDEX_NAME)) or any(path.glob("*.safetensors"))
    if not has_model_files:
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"{ggufs[0].name} is a GGUF file: qtool validate checks safetensors checkpoints" if ggufs else "pass a Hugging Face model directory or a config file"
        raise QtoolError(f"{path} is not a model directory: no config.json and no *.safetensors", hint)
    configs = _read_directory_configs(path)
    findings = configs.findings
    quant_config: QuantConfig | None = None
    if configs.quant_data is not None:
        quant_config, quant_findings = check_quantization_config(configs.quant_data, configs.quant_where)
        findings += quant_findings
    tensors, headers, header_findings = read_checkpoint_headers(path)
    findings += header_findings
    summary: dict[str, Any] = {
        "files": len(headers),
        "tensors": len(tensors),
        "bytes": sum(h.size for h in headers),
        "params": sum(t.numel for t in tensors.values()),
        "dtypes": dict(Counter(t.dtype for t in tensors.values())),
    }
    if configs.quant_data is None:
        return _float_model_report(path, configs.hf_config, tensors, findings, summary, config_file, device)
    report = ValidationReport("checkpoint", str(path), findings, summary)
    layer_settings, dynamic_findings = _dynamic_settings(configs.quant_data, configs.quant_where)
    findings += dynamic_findings
    if quant_config is not None and not has_errors(dynamic_findings):
        readable = {h.file for h in headers if h.readable}
        layer_findings, layer_count = check_gptq_tensors(path, tensors, readable, quant_config, layer_settings)
        report.findings += layer_findings
        summary.update(quantized_layers=layer_count, bits=quant_config.bits, group_size=quant_config.group_size,
                       sym=quant_config.sym, desc_act=quant_config.desc_act, checkpoint_format=quant_config.checkpoint_format)
        if layer_count == 0 and tensors:
            report.findings.append(error("tensors", f"{configs.quant_where} declares GPTQ but no tensor ends in .qweight", "point at the quantized checkpoint, or remove quantization_config"))
        else:
            group = "per channel" if quant_config.group_size == -1 else f"group size {quant_config.group_size}"
            report.findings.append(info(
                "summary",
                f"GPTQ {quant_config.bits}-bit, {group}, {quant_config.checkpoint_format} format: {layer_count} quantized layers, "
                f"{summary['tensors']} tensors in {summary['files']} file(s)",
            ))
    if config_file is not None:
        report.findings.append(warning("--config", "only applies to float models: this checkpoint is already quantized", "drop --config"))
    return report


def _float_model_report(path: Path, hf_config: dict[str, Any] | None, tensors: dict[str, TensorHeader], findings: list[Finding],
                        summary: dict[str, Any], config_file: str | Path | None, device: str) -> ValidationReport:
    report = ValidationReport("float_model", str(path), findings, summary)
    gptq_layers = [p for p, parts in group_gptq_tensors(tensors).items() if "qweight" in parts]
    if gptq_layers:
        report.findings.append(error(
            "config.json",
            f"has no quantization_config but {len(gptq_layers)} layers hold GPTQ tensors (first: {gptq_layers[0]})",
            "add the quantization_config the checkpoint was written with",
        ))
    dtypes = ", ".join(f"{d} ×{n}" for d, n in sorted(summary["dtypes"].items()))
    report.findings.append(info(
        "summary",
        f"float model: {summary['tensors']} tensors, {summary['params']:,} parameters in {summary['files']} file(s) ({dtypes or 'no tensors'})",
    ))
    if config_file is not None:
        report.findings += _model_aware_findings(path, hf_config, tensors, config_file, device, report.summary)
    return report


def _model_aware_findings(path: Path, hf_config: dict[str, Any] | None, tensors: dict[str, TensorHeader],
                          config_file: str | Path, device: str, summary: dict[str, Any]) -> list[Finding]:
    """The config's own rules, then its group size against the model's linears, then memory on the device."""
    config, findings = _read_config(config_file)
    if config is None:
        return findings
    findings = validate_config(config)
    model_config = _transformers_config(hf_config)
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
    findings += validate_for_hardware(config, stats, torch_device)
    summary["memory_estimate"] = estimate_peak_memory(config, stats, torch_device)
    return findings


def _transformers_config(hf_config: dict[str, Any] | None) -> Any:
    """config.json as a transformers config object (attribute names resolved), or None."""
    if not hf_config or "model_type" not in hf_config:
        return None
    from transformers import AutoConfig

    fields = dict(hf_config)
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError, TypeError):
        return None
