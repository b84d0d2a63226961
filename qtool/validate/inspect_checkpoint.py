"""What `qtool validate` checks: a config file (schema), a GPTQ or EXL2 checkpoint directory (config, safetensors
headers, shard index, the quantized tensors) or a float model directory (headers, and with a config the
model-aware rules)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, error, has_errors, info, warning
from qtool.models.rules import LAYER_INDEX, ModelStats, estimate_peak_memory, validate_for_hardware, validate_for_model
from qtool.core.config import (
    CONFIG_SUFFIXES,
    EXL2_BPW_RANGE,
    EXL2_HEAD_BITS,
    PRESETS_DIR,
    QuantConfig,
    config_from_dict,
    preset_names,
    read_config_file,
    validate_config,
)
from qtool.formats.exl2 import (
    COLUMN_ALIGNMENT,
    EXL2_TENSOR_SUFFIXES,
    OPTIONAL_SUFFIXES,
    check_exl2_layout,
    expected_exl2_shapes,
    group_layout_from_tensors,
)
from qtool.validate.gptq_checks import REEXPORT, LayerSettings, check_gptq_tensors, group_gptq_tensors
from qtool.formats.gptq_config import parse_gptq_config
from qtool.formats.safetensors_header import INDEX_NAME, TensorHeader, read_checkpoint_headers
from qtool.checkpoints.footprint import exl2_bits_per_weight, exl2_head_code_bits
from qtool.models.architectures import get_architecture
from qtool.checkpoints.sources import resolve_device

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
    as a QuantConfig when it is usable for the GPTQ tensor checks. An EXL2 one is checked on its own (bits,
    head_bits, version; `qtool validate` also holds it against the tensors) and gives no QuantConfig."""
    if not isinstance(data, dict):
        return None, [error(where, f"must be a JSON object, got {type(data).__name__}", "restore or re-create it")]
    found: list[Finding] = []
    method = data.get("quant_method")
    if method is None:
        found.append(error(f"{where}.quant_method", "is missing", 'add "quant_method": "gptq"'))
    elif method == "exl2":
        return None, check_exl2_quantization_config(data, where)  # no QuantConfig: the EXL2 checks need none
    elif method != "gptq":
        return None, [error(f"{where}.quant_method", f"{method!r} is not supported", "qtool validates GPTQ and EXL2 checkpoints (quant_method gptq or exl2)")]
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
    declares_exl2 = isinstance(configs.quant_data, dict) and configs.quant_data.get("quant_method") == "exl2"
    if configs.quant_data is not None and not declares_exl2:  # EXL2's config is checked against its tensors
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
    if declares_exl2:
        _add_exl2_findings(report, path, configs, tensors, {h.file for h in headers if h.readable})
        return _with_config_file_warning(report, config_file)
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
    return _with_config_file_warning(report, config_file)


def _with_config_file_warning(report: ValidationReport, config_file: str | Path | None) -> ValidationReport:
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
    exl2_layers = sorted(name.removesuffix(".q_weight") for name in tensors if name.endswith(".q_weight"))
    if exl2_layers:
        report.findings.append(error(
            "config.json",
            f"has no quantization_config but {len(exl2_layers)} layers hold EXL2 tensors (first: {exl2_layers[0]})",
            'add the quantization_config the checkpoint was written with ("quant_method": "exl2", bits, head_bits, version)',
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


# ---------------------------------------------------------------- EXL2 checkpoints

VERSION_PATTERN = re.compile(r"^\d+(\.\d+)*([+-].*)?$")  # "0.3.2", "0.2.8+cu121.torch2.4.0"
EXL2_LINEAR_SUFFIXES = EXL2_TENSOR_SUFFIXES + OPTIONAL_SUFFIXES + ("bias",)
# The dtypes ExLlamaV2 writes (exl2_format.expected_exl2_shapes); qtool's reader also takes the index tensors in
# any integer dtype and q_scale_max in any float dtype, which ExLlamaV2's kernels do not take as they are.
EXL2_DTYPES = {"q_weight": "I32", "q_invperm": "I32", "q_perm": "I32", "q_scale": "I32", "q_scale_max": "F16", "q_groups": "I16"}
INTEGER_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
CONVERTED_ON_LOAD = {"q_invperm": INTEGER_DTYPES, "q_perm": INTEGER_DTYPES, "q_groups": INTEGER_DTYPES, "q_scale_max": FLOAT_DTYPES}


@dataclass(frozen=True)
class Exl2Stored:
    """What an EXL2 checkpoint's tensors store, from their headers: the bits per weight of its linears but the
    head (as ExLlamaV2 counts them) and the head's mean code width (None: the head stays float)."""

    bits_per_weight: float | None
    head_code_bits: float | None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_exl2_quantization_config(data: dict[str, Any], where: str, stored: Exl2Stored | None = None) -> list[Finding]:
    """bits (bits per weight), head_bits and version as ExLlamaV2's converter writes them; with `stored`, bits
    and head_bits are also held against what the tensors store."""
    return _check_exl2_bits(data, where, stored) + _check_exl2_head_bits(data, where, stored) + _check_exl2_version(data, where)


def _check_exl2_bits(data: dict[str, Any], where: str, stored: Exl2Stored | None) -> list[Finding]:
    """ExLlamaV2 writes its target, 2.0 to 8.0; qtool's converter writes what the linears store (rounded to
    0.01), which goes past 8.0 for 8-bit codes (their scales and permutation add to the 8 bits)."""
    key, (low, high) = f"{where}.bits", EXL2_BPW_RANGE
    if "bits" not in data:
        return [error(key, "is missing", f'add "bits": the bits per weight the checkpoint was quantized to ({low} to {high})')]
    bits = data["bits"]
    if not _is_number(bits):
        return [error(key, f"must be a number, got {bits!r}", "write the bits per weight as a number, e.g. 4.0")]
    measured = stored.bits_per_weight if stored is not None else None
    if low <= bits <= high or (measured is not None and abs(bits - measured) <= 0.005):  # NaN fails both
        return []
    told = f"; its linears store {measured:.2f}" if measured is not None else ""
    return [error(key, f"{bits} is out of range", f"EXL2 stores {low} to {high} bits per weight{told}")]


def _check_exl2_head_bits(data: dict[str, Any], where: str, stored: Exl2Stored | None) -> list[Finding]:
    """ExLlamaV2 quantizes a head at 6 or 8 bits and qtool writes 0 for a float head; qtool's converter writes a
    quantized head's mean code width, whatever it is. Loaders go by the tensors: a value they contradict only
    misleads (a warning)."""
    key, valid = f"{where}.head_bits", ", ".join(map(str, EXL2_HEAD_BITS))
    if "head_bits" not in data:
        return [warning(key, "is missing", f"add head_bits: 0 when the head stays float, else its bits (valid: {valid})")]
    value = data["head_bits"]
    if not _is_number(value):
        return [error(key, f"must be a number, got {value!r}", f"valid: {valid} (0: the head stays float)")]
    if stored is None:
        return [] if value in EXL2_HEAD_BITS else [error(key, f"{value!r} is not valid", f"valid: {valid} (0: the head stays float)")]
    width = stored.head_code_bits
    actual = 0 if width is None else round(width)
    if value == actual:
        return []
    held = "the head stays float" if width is None else f"the head's codes take {round(width, 2):g} bits"
    if value in EXL2_HEAD_BITS:
        return [warning(key, f"is {value!r} but {held}", f"set head_bits {actual}")]
    return [error(key, f"{value!r} is not valid and {held}", f"set head_bits {actual}; valid: {valid}, or the code width of a quantized head")]


def _check_exl2_version(data: dict[str, Any], where: str) -> list[Finding]:
    key, example = f"{where}.version", "e.g. \"0.3.2\""
    if "version" not in data:
        return [warning(key, "is missing", f"add the ExLlamaV2 version whose layout the tensors follow, {example}")]
    value = data["version"]
    if not isinstance(value, str) or not VERSION_PATTERN.match(value):
        return [error(key, f"{value!r} is not a version", f"write the ExLlamaV2 version as a string, {example}")]
    return []


def group_exl2_tensors(tensors: dict[str, TensorHeader]) -> dict[str, dict[str, TensorHeader]]:
    """Linear prefix -> {suffix: header} for every tensor named <linear>.<q_weight|q_invperm|q_perm|q_scale|
    q_scale_max|q_groups>; a linear that holds a q_weight also gets its other tensors (bias, or ones that do not
    belong there)."""
    layers: dict[str, dict[str, TensorHeader]] = defaultdict(dict)
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in EXL2_TENSOR_SUFFIXES + OPTIONAL_SUFFIXES:
            layers[prefix][suffix] = tensor
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if "q_weight" in layers.get(prefix, {}):
            layers[prefix].setdefault(suffix, tensor)
    return dict(layers)


class _TensorReader:
    """Single tensors of the checkpoint files whose headers passed, each file opened once (memory-mapped: only
    the tensors asked for are read)."""

    def __init__(self, directory: Path, readable: set[str], stack: ExitStack):
        self.directory, self.readable, self.stack = directory, readable, stack
        self.handles: dict[str, Any] = {}

    def can_read(self, *tensors: TensorHeader) -> bool:
        return all(t.file in self.readable for t in tensors)

    def __call__(self, tensor: TensorHeader) -> torch.Tensor:
        if tensor.file not in self.handles:
            self.handles[tensor.file] = self.stack.enter_context(safe_open(str(self.directory / tensor.file), framework="pt"))
        return self.handles[tensor.file].get_tensor(tensor.name)


def check_exl2_tensors(directory: Path, tensors: dict[str, TensorHeader], readable_files: set[str]) -> tuple[list[Finding], int]:
    """Findings for every EXL2 linear, and the number of linears holding a q_weight. Reads only q_groups,
    q_invperm, q_perm and q_scale_max, of linears whose headers are right."""
    layers = group_exl2_tensors(tensors)
    found: list[Finding] = []
    with ExitStack() as stack:
        read = _TensorReader(directory, readable_files, stack)
        for prefix, parts in sorted(layers.items()):
            found += _check_exl2_linear(prefix, parts, read)
    return found, sum(1 for parts in layers.values() if "q_weight" in parts)


def _check_exl2_linear(prefix: str, parts: dict[str, TensorHeader], read: _TensorReader) -> list[Finding]:
    missing = _exl2_missing(prefix, parts)
    dtype_findings = [f for suffix, tensor in parts.items() if suffix in EXL2_DTYPES for f in _exl2_dtype(tensor, suffix)]
    found = missing + _exl2_extras(parts) + dtype_findings
    if missing:
        return found
    layout, layout_findings = _exl2_layout(prefix, parts, read)
    found += layout_findings
    if layout is None:
        return found
    shape_findings = _exl2_shapes(parts, *layout)
    found += shape_findings
    values = [parts[s] for s in ("q_invperm", "q_perm", "q_scale_max") if s in parts]
    if not has_errors(shape_findings + dtype_findings) and read.can_read(*values):
        found += _exl2_values(parts, read)
    return found


def _exl2_missing(prefix: str, parts: dict[str, TensorHeader]) -> list[Finding]:
    if "q_weight" not in parts:
        held = ", ".join(sorted(parts))
        return [error(f"{prefix}.q_weight", f"is missing: {prefix} holds {held} but no q_weight", "restore the linear's q_weight, or remove its other EXL2 tensors")]
    needed = f"an EXL2 linear needs {', '.join(EXL2_TENSOR_SUFFIXES)}: the checkpoint is incomplete: re-export it"
    return [error(f"{prefix}.{suffix}", "is missing", needed) for suffix in EXL2_TENSOR_SUFFIXES if suffix not in parts]


def _exl2_extras(parts: dict[str, TensorHeader]) -> list[Finding]:
    """Tensors of a quantized linear that no EXL2 loader has a place for (a float weight left next to q_weight)."""
    valid = ", ".join(EXL2_LINEAR_SUFFIXES)
    return [
        error(tensor.name, "does not belong to an EXL2 linear: loaders report it as unexpected", f"an EXL2 linear holds {valid}: remove it")
        for suffix, tensor in parts.items()
        if suffix not in EXL2_LINEAR_SUFFIXES
    ]


def _exl2_dtype(tensor: TensorHeader, suffix: str) -> list[Finding]:
    expected = EXL2_DTYPES[suffix]
    if tensor.dtype == expected:
        return []
    if tensor.dtype in CONVERTED_ON_LOAD.get(suffix, ()):
        return [warning(tensor.name, f"dtype {tensor.dtype}: ExLlamaV2 stores {suffix} as {expected}", "qtool converts it on load; ExLlamaV2 may not")]
    return [error(tensor.name, f"dtype {tensor.dtype} but EXL2 stores {suffix} as {expected}", REEXPORT)]


def _without_name(message: str, *names: str) -> str:
    """A QtoolError message of exl2_format without the tensor or linear name it starts with."""
    for name in names:
        if message.startswith(name):
            return message.removeprefix(name).lstrip(":. ")
    return message


def _exl2_layout(prefix: str, parts: dict[str, TensorHeader], read: _TensorReader) -> tuple[tuple[tuple[int, ...], tuple[int, ...]] | None, list[Finding]]:
    """(bits, rows) of each group as q_groups describes them over q_weight's packed rows, checked as ExLlamaV2's
    kernels need them (widths 8..2 never increasing, groups of a multiple of 32 rows); None with the finding
    when they cannot be."""
    q_weight, q_groups = parts["q_weight"], parts["q_groups"]
    if len(q_weight.shape) != 2:
        return None, [error(q_weight.name, f"shape {list(q_weight.shape)} is not 2-D", "q_weight is [packed rows, outputs]: " + REEXPORT)]
    columns = q_weight.shape[1]
    if columns == 0 or columns % COLUMN_ALIGNMENT:
        return None, [error(q_weight.name, f"has {columns} columns", f"EXL2 pads the outputs to a positive multiple of {COLUMN_ALIGNMENT}: " + REEXPORT)]
    if q_groups.dtype not in INTEGER_DTYPES or not read.can_read(q_groups):
        return None, []  # the dtype's or the file's finding says why
    try:
        bits, sizes = group_layout_from_tensors(read(q_groups), q_weight.shape[0], prefix)
        check_exl2_layout(sum(sizes), columns, bits, sizes, prefix)
    except QtoolError as exc:
        return None, [error(q_groups.name, _without_name(exc.message, q_groups.name, prefix), exc.hint or REEXPORT)]
    return (bits, sizes), []


def _layout_text(bits: tuple[int, ...], sizes: tuple[int, ...]) -> str:
    """e.g. "32 rows at 6 bits, 64 rows at 4 bits" (consecutive groups of one width together)."""
    runs: list[list[int]] = []
    for b, size in zip(bits, sizes):
        if runs and runs[-1][0] == b:
            runs[-1][1] += size
        else:
            runs.append([b, size])
    return ", ".join(f"{size} rows at {b} bits" for b, size in runs)


def _exl2_shapes(parts: dict[str, TensorHeader], bits: tuple[int, ...], sizes: tuple[int, ...]) -> list[Finding]:
    """Every tensor's shape against the group layout: q_invperm and q_perm hold the input rows q_groups
    describes, q_scale and q_scale_max one row or value per group, a bias one value per output."""
    q_weight, q_groups = parts["q_weight"], parts["q_groups"]
    in_features, columns = sum(sizes), q_weight.shape[1]
    expected = expected_exl2_shapes(in_features, columns, bits, sizes)
    found = []
    invperm = parts["q_invperm"]
    if invperm.shape != expected["q_invperm"][0]:
        found.append(error(
            q_groups.name,
            f"describes {in_features} input rows ({_layout_text(bits, sizes)}) over q_weight's {q_weight.shape[0]} packed rows, "
            f"but {invperm.name} has shape {list(invperm.shape)}",
            "q_groups, q_weight and q_invperm disagree: " + REEXPORT,
        ))
        expected["q_perm"] = (invperm.shape, None)  # q_perm must still agree with q_invperm
        del expected["q_invperm"]
    rule = f"q_groups ({_layout_text(bits, sizes)}) and q_weight {list(q_weight.shape)}"
    for suffix, (shape, _) in expected.items():
        tensor = parts.get(suffix)
        if tensor is not None and tensor.shape != tuple(shape):
            found.append(error(tensor.name, f"shape {list(tensor.shape)} but {rule} imply {list(shape)}", REEXPORT))
    return found + _exl2_bias(parts.get("bias"), columns)


def _exl2_bias(bias: TensorHeader | None, columns: int) -> list[Finding]:
    """The bias holds the true output width, which q_weight pads to the next multiple of 32."""
    if bias is None:
        return []
    low = columns - COLUMN_ALIGNMENT + 1
    if len(bias.shape) != 1 or not low <= bias.shape[0] <= columns:
        return [error(bias.name, f"shape {list(bias.shape)} but q_weight's {columns} columns hold {low} to {columns} outputs (padded to a multiple of {COLUMN_ALIGNMENT})", REEXPORT)]
    if bias.dtype not in FLOAT_DTYPES:
        return [error(bias.name, f"dtype {bias.dtype}: a bias is a float tensor", REEXPORT)]
    return []


def _exl2_values(parts: dict[str, TensorHeader], read: _TensorReader) -> list[Finding]:
    """q_invperm and q_perm are permutations of the input rows and inverse to each other; q_scale_max finite
    and not negative (qtool's reader and ExLlamaV2's scales need both)."""
    invperm, perm = parts["q_invperm"], parts.get("q_perm")
    invperm_values = read(invperm)
    found = _permutation_findings(invperm, invperm_values)
    if perm is not None:
        perm_values = read(perm)
        found += _permutation_findings(perm, perm_values)
        if not found:
            inverse = torch.argsort(invperm_values.to(torch.int64))
            if not torch.equal(perm_values.to(torch.int64), inverse):
                found.append(error(perm.name, f"is not the inverse of {invperm.name}", "stored row k holds input row q_perm[k] and q_invperm[q_perm[k]] = k: " + REEXPORT))
    scale_max = parts["q_scale_max"]
    values = read(scale_max).to(torch.float32)
    bad = ~torch.isfinite(values) | (values < 0)
    if bad.any():
        first = int(bad.nonzero()[0])
        found.append(error(scale_max.name, f"{int(bad.sum())} of {values.numel()} values are negative or not finite (first: group {first}, {values[first].item():g})", REEXPORT))
    return found


def _permutation_findings(tensor: TensorHeader, values: torch.Tensor) -> list[Finding]:
    size = values.numel()
    fix = f"{tensor.name.rpartition('.')[2]} must hold each of the {size} input rows 0..{size - 1} once: " + REEXPORT
    rows = values.to(torch.int64).reshape(-1)
    outside = (rows < 0) | (rows >= size)
    if outside.any():
        first = int(outside.nonzero()[0])
        return [error(tensor.name, f"{int(outside.sum())} value(s) lie outside 0..{size - 1} (first at {first}: {int(rows[first])})", fix)]
    counts = torch.bincount(rows, minlength=size)
    if (counts != 1).any():
        repeated = int((counts > 1).nonzero()[0])
        return [error(tensor.name, f"is not a permutation: row {repeated} appears {int(counts[repeated])} times and {int((counts == 0).sum())} row(s) never", fix)]
    return []


def exl2_stored(tensors: dict[str, TensorHeader]) -> Exl2Stored:
    """Bits per weight and head width from the headers, counted as `qtool eval`'s footprint counts them (the
    count trusts the shapes: only for linears that passed their checks)."""
    return Exl2Stored(exl2_bits_per_weight(tensors), exl2_head_code_bits(tensors))


def _add_exl2_findings(report: ValidationReport, path: Path, configs: _DirectoryConfigs, tensors: dict[str, TensorHeader], readable: set[str]) -> None:
    """The EXL2 linears' findings, the quantization_config against what they store, and the summary."""
    data, where = configs.quant_data, configs.quant_where
    tensor_findings, layer_count = check_exl2_tensors(path, tensors, readable)
    # Broken tensors cannot be counted: the config is then checked on its own (bits 2.0..8.0, head_bits 0/6/8).
    stored = exl2_stored(tensors) if layer_count and not has_errors(tensor_findings) else None
    report.findings += check_exl2_quantization_config(data, where, stored) + tensor_findings
    report.summary.update(quantized_layers=layer_count, bits=data.get("bits"), head_bits=data.get("head_bits"), version=data.get("version"))
    if layer_count == 0 and tensors:
        report.findings.append(error("tensors", f"{where} declares EXL2 but no tensor ends in .q_weight", "point at the quantized checkpoint, or remove quantization_config"))
        return
    if stored is None:
        return
    report.summary.update(stored_bits_per_weight=stored.bits_per_weight, head_code_bits=stored.head_code_bits)
    head = "float head" if stored.head_code_bits is None else f"{round(stored.head_code_bits, 2):g}-bit head"
    report.findings.append(info(
        "summary",
        f"EXL2 {stored.bits_per_weight:.2f} bpw stored (config: {data.get('bits')}), {head}: {layer_count} quantized layers, "
        f"{report.summary['tensors']} tensors in {report.summary['files']} file(s)",
    ))
