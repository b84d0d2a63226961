"""Check a checkpoint's quantization_config: a GPTQ one with the choices and rules of qtool's own config (giving
the QuantConfig the GPTQ tensor checks use), an EXL2 one with exl2_config's checks."""

from __future__ import annotations

import dataclasses
from typing import Any

from qtool.config.schema import QuantConfig, config_from_dict, validate_config
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, error, has_errors
from qtool.validate.exl2_config import check_exl2_quantization_config
from qtool.validate.report import finding_from_error

# quantization_config keys that map onto QuantConfig fields; the others (tool versions, paths) are not checked.
QUANT_KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential", "damp_percent", "checkpoint_format")
REQUIRED_QUANT_KEYS = ("bits", "group_size")


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
            found.append(finding_from_error(exc, f"{where}.{key}"))
    for key in REQUIRED_QUANT_KEYS:
        if key not in data:
            found.append(error(f"{where}.{key}", "is missing", f"add \"{key}\" with the value the checkpoint was quantized with"))
    config = config_from_dict(usable, where=where)
    rule_findings = [f for f in validate_config(config) if f.level.value != "info"]
    found += [dataclasses.replace(f, where=f"{where}.{f.where}") for f in rule_findings]
    if has_errors(found):
        return None, found
    return config, found
