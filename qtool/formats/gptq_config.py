"""The quantization_config of a GPTQ checkpoint: building the one qtool writes, and reading the spellings AutoGPTQ,
GPTQModel and transformers write (config.json's quantization_config or quantize_config.json)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from qtool.core.errors import QtoolError
from qtool.core.json_file import read_json_file
from qtool.formats.gptq import GPTQ_CHECKPOINT_FORMATS, check_checkpoint_format, check_gptq_bits, check_group_size
from qtool.formats.quantized_weight import QuantizedWeight

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
LEGACY_QUANTIZE_CONFIG_FILES = (QUANTIZE_CONFIG_FILE, "quant_config.json")
RESTORE_FILE = "restore or re-create the file"
DEFAULT_FIELDS = {"desc_act": False, "sym": True, "static_groups": False, "true_sequential": True, "damp_percent": 0.01}


@dataclass(frozen=True)
class GPTQCheckpointConfig:
    """What a loader needs from a checkpoint's quantization config; `source` is the file it came from."""

    bits: int
    group_size: int
    checkpoint_format: str
    sym: bool
    desc_act: bool
    source: str
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def settings_for(self, module_name: str) -> tuple[int, int] | None:
        """(bits, group_size) of one module after GPTQModel's `dynamic` overrides (first matching pattern wins;
        "-:" patterns leave the module unquantized: None)."""
        for pattern, overrides in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
            if re.match(regex, module_name):
                if negative:
                    return None
                overrides = overrides or {}
                return int(overrides.get("bits", self.bits)), int(overrides.get("group_size", self.group_size))
        return self.bits, self.group_size


def qtool_version() -> str:
    try:
        return metadata.version("qtool")
    except metadata.PackageNotFoundError:
        return "unknown"


def _is_default_g_idx(qw: QuantizedWeight) -> bool:
    rows = torch.arange(qw.in_features, device=qw.g_idx.device)
    default = torch.zeros_like(rows) if qw.group_size == -1 else rows // qw.group_size
    return torch.equal(qw.g_idx.to(default.dtype), default)


@dataclass(frozen=True)
class WeightFacts:
    """What a GPTQ quantization_config says about one quantized linear: taken from each weight as it is packed,
    so that a checkpoint written from weights read one layer at a time reads each of them once."""

    bits: int
    group_size: int
    natural_order: bool  # g_idx is arange(in_features) // group_size (no act order)
    symmetric: bool  # every zero point is 2**(bits-1)

    @classmethod
    def of(cls, qw: QuantizedWeight) -> "WeightFacts":
        return cls(qw.bits, qw.group_size, _is_default_g_idx(qw), bool((qw.zeros == 1 << (qw.bits - 1)).all()))


def resolve_checkpoint_format(user_config: dict[str, Any] | None, checkpoint_format: str | None = None) -> str:
    """The checkpoint format to pack in: the argument or the caller's quantization_config (which must agree), else gptq;
    checked before any weight is read."""
    user = dict(user_config or {})
    method = str(user.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise QtoolError(f"quantization_config.quant_method {method!r} cannot be saved as a GPTQ checkpoint", "use quant_method gptq")
    named_format = user.get("checkpoint_format", user.get("format"))
    if checkpoint_format and named_format and named_format != checkpoint_format:
        raise QtoolError(f"checkpoint_format {checkpoint_format!r} conflicts with quantization_config's {named_format!r}", "pass one of them")
    fmt = checkpoint_format or named_format or "gptq"
    check_checkpoint_format(fmt)
    return fmt


def build_quantization_config(
    quantized: dict[str, QuantizedWeight], user_config: dict[str, Any] | None, checkpoint_format: str | None = None
) -> dict[str, Any]:
    """The quantization_config qtool writes: GPTQ defaults, then the caller's fields, checked against the
    quantized weights (bits, group size, act order, symmetry must describe them truthfully)."""
    if not quantized:
        raise QtoolError("no quantized linears to save", "quantize at least one linear before saving a GPTQ checkpoint")
    return quantization_config_from_facts([WeightFacts.of(qw) for qw in quantized.values()], user_config, checkpoint_format)


def quantization_config_from_facts(
    facts: list[WeightFacts], user_config: dict[str, Any] | None, checkpoint_format: str | None = None
) -> dict[str, Any]:
    """build_quantization_config from the facts of each quantized linear."""
    if not facts:
        raise QtoolError("no quantized linears to save", "quantize at least one linear before saving a GPTQ checkpoint")
    user = dict(user_config or {})
    fmt = resolve_checkpoint_format(user, checkpoint_format)
    widths = {(f.bits, f.group_size) for f in facts}
    if len(widths) != 1:
        raise QtoolError(
            f"the quantized linears mix bits/group sizes {sorted(widths)}", "a GPTQ checkpoint has one bits and group_size for all linears"
        )
    ((bits, group_size),) = widths
    for key, actual in (("bits", bits), ("group_size", group_size)):
        if key in user and int(user[key]) != actual:
            raise QtoolError(f"quantization_config.{key} is {user[key]} but the quantized weights have {actual}", f"drop {key} or set it to {actual}")

    act_order = not all(f.natural_order for f in facts)
    symmetric = all(f.symmetric for f in facts)
    if user.get("desc_act") is False and act_order:
        raise QtoolError("quantization_config.desc_act is false but a g_idx is not in natural group order", "set desc_act true (act-order checkpoint)")
    if user.get("sym") is True and not symmetric:
        raise QtoolError(f"quantization_config.sym is true but some zero point differs from {1 << (bits - 1)}", "set sym false")

    config: dict[str, Any] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, **DEFAULT_FIELDS}
    config.update({"desc_act": act_order, "sym": symmetric})
    config.update(user)
    config.update({"quant_method": "gptq", "bits": bits, "group_size": group_size, "checkpoint_format": fmt, "pack_dtype": "int32"})
    if "format" in config:
        config["format"] = fmt
    meta = dict(config.get("meta") or {})
    quantizers = list(meta.get("quantizer") or [])
    quantizers = [quantizers] if isinstance(quantizers, str) else quantizers
    tag = f"qtool:{qtool_version()}"
    meta["quantizer"] = quantizers + [tag] if tag not in quantizers else quantizers
    config["meta"] = meta
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise QtoolError(f"quantization_config cannot be written as JSON: {exc}", "pass plain numbers, strings, lists and dicts") from exc
    return config


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise QtoolError(f"{where} is {value!r}, expected true or false")


def parse_gptq_config(data: dict[str, Any], where: str) -> GPTQCheckpointConfig | None:
    """The GPTQ settings of one quantization config dict, None when it declares another method; `where` (the
    file) labels errors."""
    method = str(data.get("quant_method", data.get("method", "gptq"))).lower()
    if method != "gptq":
        return None
    if data.get("is_marlin_format"):
        raise QtoolError(f"{where}: Marlin-format GPTQ checkpoints (is_marlin_format) are not supported", "use a checkpoint saved in the gptq or gptq_v2 format")
    fmt = str(data.get("checkpoint_format") or data.get("format") or "gptq").lower()
    if fmt not in GPTQ_CHECKPOINT_FORMATS:
        raise QtoolError(f"{where}: checkpoint_format {fmt!r} is not supported", f"qtool loads {' and '.join(GPTQ_CHECKPOINT_FORMATS)} checkpoints")
    pack_dtype = str(data.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise QtoolError(f"{where}: pack_dtype {pack_dtype} is not supported", "qtool loads GPTQ tensors packed in int32 words")
    try:
        bits, group_size = int(data["bits"]), int(data["group_size"])
    except KeyError as exc:
        raise QtoolError(f"{where}: quantization config has no {exc.args[0]!r}", "add the value the checkpoint was quantized with") from exc
    except (TypeError, ValueError) as exc:
        raise QtoolError(f"{where}: bits and group_size must be integers, got {data.get('bits')!r} and {data.get('group_size')!r}") from exc
    check_gptq_bits(bits, where)
    check_group_size(group_size, where)
    dynamic = data.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise QtoolError(f"{where}: dynamic must be a mapping of module patterns to overrides")
    return GPTQCheckpointConfig(
        bits=bits,
        group_size=group_size,
        checkpoint_format=fmt,
        sym=_as_bool(data.get("sym", True), f"{where}: sym"),
        desc_act=_as_bool(data.get("desc_act", False), f"{where}: desc_act"),
        source=where,
        dynamic=dynamic,
        raw=dict(data),
    )


def read_gptq_config(directory: Path) -> GPTQCheckpointConfig | None:
    """The GPTQ config of a checkpoint directory: config.json's quantization_config, else quantize_config.json
    (AutoGPTQ); None if neither declares GPTQ. Both present and disagreeing is an error."""
    directory = Path(directory)
    found: list[GPTQCheckpointConfig] = []
    other_method = None
    config_path = directory / CONFIG_FILE
    if config_path.exists():
        config = read_json_file(config_path, RESTORE_FILE)
        section = config.get("quantization_config")
        if isinstance(section, dict):
            parsed = parse_gptq_config(section, f"{config_path} (quantization_config)")
            if parsed is None:
                other_method = section.get("quant_method")
            else:
                found.append(parsed)
    for name in LEGACY_QUANTIZE_CONFIG_FILES:
        legacy_path = directory / name
        if legacy_path.exists():
            data = read_json_file(legacy_path, RESTORE_FILE)
            parsed = parse_gptq_config(data, str(legacy_path))
            if parsed is not None:
                found.append(parsed)
            break
    if other_method is not None:
        return None
    if len(found) == 2:
        first, second = found
        key = lambda c: (c.bits, c.group_size, c.checkpoint_format)  # noqa: E731
        if key(first) != key(second):
            raise QtoolError(
                f"{first.source} says bits {first.bits}, group_size {first.group_size}, {first.checkpoint_format} but "
                f"{second.source} says bits {second.bits}, group_size {second.group_size}, {second.checkpoint_format}",
                "make the two files agree (re-export the checkpoint)",
            )
    return found[0] if found else None
