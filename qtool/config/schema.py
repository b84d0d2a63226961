"""The one quantization config of qtool: a typed, versioned dataclass read from YAML/JSON/TOML or a preset,
overridden by CLI flags, validated in one place, and written back into every output."""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, Level, error, info, raise_first_error, warning
from qtool.core.text_file import read_utf8
# The widths, the group-size rule and the format names are the format layer's: this validator applies them, it
# does not restate them. gptq_settings is gptq.py's torch-free half: reading a config must not import torch.
from qtool.formats.gptq_settings import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, PER_CHANNEL_GROUP_SIZE, is_valid_group_size
from qtool.formats.registry import QUANT_FORMATS

SCHEMA_VERSION = 1
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

METHODS = ("gptq", "rtn")
BITS = GPTQ_BITS
OUTPUT_FORMATS = tuple(QUANT_FORMATS)
# EXL2: the average bits per weight of the decoder linears, and the widths the output head may take (0: float16)
EXL2_BPW_RANGE = (2.0, 8.0)
EXL2_HEAD_BITS = (0, 6, 8)
# fields that only GPTQ output reads: with EXL2 the optimizer picks widths and groups per linear
GPTQ_ONLY_FIELDS = ("bits", "group_size", "sym", "static_groups", "mse", "checkpoint_format")
CHECKPOINT_FORMATS = GPTQ_CHECKPOINT_FORMATS
# dtype of the calibration forward passes and of the Hessian products (weights are always solved in float32);
# auto: bfloat16 where the hardware multiplies it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")
# qtool's own floor on top of the format's group-size rule (any positive size): smaller groups cost more in
# scales than they win, so a config asking for them is refused (a checkpoint holding them still loads).
MIN_GROUP_SIZE = 16
# What `qtool quantize` starts from when no --config is given: asym + act order with static groups + scale
# refinement measured best on SmolLM2 (bench/RESULTS.md: ppl 24.85 at 4-bit g128, GPTQModel 25.97-27.61).
QUANTIZE_DEFAULT_PRESET = "gptq-4bit-g128"
QUANTIZE_EXL2_PRESET = "exl2-4bpw"  # ... and with --format exl2


@dataclass
class CalibrationConfig:
    source: str = "wikitext"  # "wikitext" or the path of a text file
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    # calibration tokens per forward call through a layer (whole samples; a longer sample runs alone); 0: the
    # runner's default (models.layerwise.BATCH_TOKENS). More means fewer, larger calls for more scratch memory.
    batch_tokens: int = 0


@dataclass
class QuantConfig:
    schema_version: int = SCHEMA_VERSION
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    # The dataclass keeps GPTQModel's defaults; `qtool quantize` starts from the preset QUANTIZE_DEFAULT_PRESET.
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    mse: bool = False
    # after GPTQ, refit each group's scale to the layer's output error with codes and zeros fixed
    refine_scales: bool = False
    # the calibration forwards and Hessian products run in this dtype (autocast; sums and the solve stay float32)
    compute_dtype: str = "float32"
    output_format: str = "gptq"  # gptq, or exl2 (mixed widths per linear chosen for an average bpw)
    bpw: float = 4.0  # exl2: target bits per weight of the decoder linears
    head_bits: int = 0  # exl2: bits of the output head (0 keeps it float16)
    # exl2: when > 0, bpw is chosen so that weights + KV cache for context_length tokens fit in this many GB
    target_vram_gb: float = 0.0
    context_length: int = 0  # tokens of KV cache for target_vram_gb; 0: the model's max_position_embeddings
    checkpoint_format: str = "gptq"  # gptq = v1 zeros (zero - 1 stored); gptq_v2 stores the zero itself
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


def _field_type(dataclass_type: type, name: str) -> type:
    annotation = {f.name: f.type for f in fields(dataclass_type)}[name]
    return _TYPES.get(str(annotation).split(" ")[0], object)


def _unknown_key(key: str, valid: list[str], where: str) -> QtoolError:
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    return QtoolError(f"{where}: unknown key '{key}'", f"{guess}valid keys: {', '.join(valid)}")


def _coerce(value: Any, expected: type, where: str) -> Any:
    # bool is an int in Python; refuse it where a number is expected, and refuse numbers where a flag is.
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise QtoolError(f"{where} must be true or false, got {value!r}", "write true or false")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise QtoolError(f"{where} must be an integer, got {value!r}", "write a whole number")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise QtoolError(f"{where} must be a number, got {value!r}", "write a decimal number such as 0.01")
    if expected is str:
        if isinstance(value, str):
            return value
        raise QtoolError(f"{where} must be a string, got {value!r}", "quote the value")
    return value


def _build(dataclass_type: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise QtoolError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    valid = [f.name for f in fields(dataclass_type)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key(str(key), valid, where)
        if key == "calibration":
            kwargs[key] = _build(CalibrationConfig, value, f"{where}.calibration")
        else:
            kwargs[key] = _coerce(value, _field_type(dataclass_type, key), f"{where}.{key}")
    return dataclass_type(**kwargs)


def config_from_dict(data: dict[str, Any], where: str = "config") -> QuantConfig:
    """Build a QuantConfig from plain data, refusing unknown keys and wrong types (not ranges: see validate)."""
    version = data.get("schema_version", SCHEMA_VERSION) if isinstance(data, dict) else SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise QtoolError(
            f"{where}: schema_version {version!r} is not supported",
            f"this qtool reads schema_version {SCHEMA_VERSION}",
        )
    return _build(QuantConfig, data, where)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_config_file(path: str | Path) -> QuantConfig:
    """Read a config file (YAML, JSON or TOML by suffix) or a preset name from configs/presets."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (PRESETS_DIR / f"{path.name}.yaml").exists():
        path = PRESETS_DIR / f"{path.name}.yaml"
    if not path.exists():
        close = difflib.get_close_matches(path.name, preset_names(), n=1)
        guess = f"did you mean the preset '{close[0]}'? " if close else ""
        raise QtoolError(
            f"config file {path} does not exist",
            f"{guess}pass a .yaml/.json/.toml file or a preset: {', '.join(preset_names())}",
        )
    return config_from_dict(parse_config_file(path), where=str(path))


def parse_config_file(path: Path) -> Any:
    """The data of an existing YAML/JSON/TOML config file, by its suffix ({} for an empty one); one-line errors for
    an unknown suffix and for a syntax error. Every config of qtool (quantization, fine-tuning, jobs) reads this way."""
    if path.suffix not in CONFIG_SUFFIXES:
        raise QtoolError(f"config file {path} has an unknown type '{path.suffix}'", "use .yaml, .json or .toml")
    text = read_utf8(path)
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise QtoolError(f"config file {path} cannot be parsed: {first}", "fix the syntax") from exc
    return {} if data is None else data


def apply_overrides(config: QuantConfig, overrides: dict[str, Any]) -> QuantConfig:
    """Return a copy with the given fields replaced; None means "not given". Keys of the calibration block may
    be given flat (samples, seqlen, seed) or as calibration_source."""
    top = {f.name for f in fields(QuantConfig)}
    calibration_keys = {f.name for f in fields(CalibrationConfig)}
    top_changes: dict[str, Any] = {}
    calibration_changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        name = key.removeprefix("calibration_")
        if key in top and key != "calibration":
            top_changes[key] = _coerce(value, _field_type(QuantConfig, key), f"--{key.replace('_', '-')}")
        elif name in calibration_keys:
            calibration_changes[name] = _coerce(value, _field_type(CalibrationConfig, name), f"--{name}")
        else:
            raise _unknown_key(key, sorted(top | calibration_keys), "override")
    calibration = dataclasses.replace(config.calibration, **calibration_changes)
    return dataclasses.replace(config, calibration=calibration, **top_changes)


def _choice(where: str, value: Any, choices: tuple) -> Finding | None:
    if value in choices:
        return None
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    return error(where, f"{value!r} is not valid", f"{guess}valid: {', '.join(str(c) for c in choices)}")


def validate_config(config: QuantConfig) -> list[Finding]:
    """Types are enforced on construction; this checks ranges, choices and rules across fields."""
    found: list[Finding | None] = [
        _choice("method", config.method, METHODS),
        _choice("output_format", config.output_format, OUTPUT_FORMATS),
        _choice("compute_dtype", config.compute_dtype, COMPUTE_DTYPES),
    ]
    found.extend(_validate_exl2(config) if config.output_format == "exl2" else _validate_gptq(config))
    if not 0 < config.damp_percent < 1:
        found.append(error("damp_percent", f"{config.damp_percent} is out of range", "use a value in (0, 1), e.g. 0.01"))
    if not 0 <= config.damp_auto_increment < 1:
        found.append(error("damp_auto_increment", f"{config.damp_auto_increment} is out of range", "use a value in [0, 1), e.g. 0.0025"))
    found.extend(_validate_calibration(config.calibration))
    if config.output_format != "exl2" and config.target_vram_gb:
        found.append(error("target_vram_gb", "applies to EXL2 output only (GPTQ widths are uniform)", "add --format exl2, or choose --bits yourself"))
    return [f for f in found if f is not None]


def _validate_calibration(calibration: CalibrationConfig) -> list[Finding | None]:
    found: list[Finding | None] = []
    if calibration.samples < 1:
        found.append(error("calibration.samples", f"{calibration.samples} is out of range", "use at least 1 sample (128 is usual)"))
    if calibration.seqlen < 8:
        found.append(error("calibration.seqlen", f"{calibration.seqlen} is out of range", "use at least 8 tokens (512 or 2048 are usual)"))
    if calibration.batch_tokens < 0:
        found.append(error("calibration.batch_tokens", f"{calibration.batch_tokens} is negative", "use 0 (the default) or a token count such as 16384"))
    if calibration.seed < 0:
        found.append(error("calibration.seed", f"{calibration.seed} is negative", "use a seed >= 0"))
    if calibration.source != "wikitext" and not Path(calibration.source).is_file():
        found.append(error("calibration.source", f"file {calibration.source} does not exist", "pass 'wikitext' or the path of a text file"))
    return found


def _validate_gptq(config: QuantConfig) -> list[Finding | None]:
    found: list[Finding | None] = [
        _choice("bits", config.bits, BITS),
        _choice("checkpoint_format", config.checkpoint_format, CHECKPOINT_FORMATS),
    ]
    grouped = config.group_size != PER_CHANNEL_GROUP_SIZE
    if not is_valid_group_size(config.group_size) or (grouped and config.group_size < MIN_GROUP_SIZE):
        found.append(error("group_size", f"{config.group_size} is not valid", f"use -1 (per channel) or an integer >= {MIN_GROUP_SIZE}, e.g. 128"))
    elif grouped and config.group_size % 32:
        found.append(warning("group_size", f"{config.group_size} is not a multiple of 32", "fast kernels need multiples of 32; the torch backend will be used"))
    if config.static_groups and not config.desc_act:
        found.append(warning("static_groups", "has no effect without desc_act", "add --desc-act or drop --static-groups"))
    if config.method == "rtn" and (config.desc_act or config.static_groups):
        found.append(warning("desc_act", "act order has no effect with method rtn", "use --method gptq for act order"))
    if config.method == "rtn" and config.refine_scales:
        found.append(warning("refine_scales", "has no effect with method rtn (no calibration Hessian)", "use --method gptq"))
    if config.method == "rtn" and not config.true_sequential:
        found.append(info("true_sequential", "has no effect with method rtn"))
    if not config.sym and config.checkpoint_format == "gptq":
        found.append(info("checkpoint_format", "the v1 format cannot store an asym zero point of 0, so such zeros are clamped to 1", "write --checkpoint-format gptq_v2 to keep them"))
    return found


def _validate_exl2(config: QuantConfig) -> list[Finding | None]:
    low, high = EXL2_BPW_RANGE
    return [
        None if config.target_vram_gb >= 0 else error("target_vram_gb", f"{config.target_vram_gb} is negative", "give the GPU memory budget in GB, e.g. 24"),
        None if config.context_length >= 0 else error("context_length", f"{config.context_length} is negative", "give the tokens of KV cache to reserve (0: the model's maximum)"),
        None if low <= config.bpw <= high else error("bpw", f"{config.bpw} is out of range", f"EXL2 targets run from {low} to {high} bits per weight"),
        _choice("head_bits", config.head_bits, EXL2_HEAD_BITS),
        None if config.method == "gptq" else error("method", f"{config.method!r} cannot write EXL2", "EXL2 is quantized with GPTQ error feedback: use method gptq"),
        None if config.desc_act else info("desc_act", "EXL2 always quantizes in act order (ExLlamaV2's layout stores the permutation)"),
    ]


def check_config(config: QuantConfig) -> list[Finding]:
    """Validate and raise the first error as a QtoolError; return the warnings and infos."""
    return raise_first_error(validate_config(config))


def resolve_config(config_file: str | Path | None, overrides: dict[str, Any]) -> tuple[QuantConfig, list[Finding]]:
    """Defaults, then the file (or preset), then the flags; validated. What every command that quantizes uses."""
    base = read_config_file(config_file) if config_file else QuantConfig()
    config = apply_overrides(base, overrides)
    findings = validate_config(config)
    if config_file:
        # an error in a field no flag set comes from the file: say which file, or the user hunts for it
        flagged = {key.removeprefix("calibration_") for key, value in overrides.items() if value is not None}
        findings = [
            f if f.level is not Level.ERROR or f.where.split(".")[-1] in flagged else dataclasses.replace(f, where=f"{config_file}: {f.where}")
            for f in findings
        ]
    return config, raise_first_error(findings)
