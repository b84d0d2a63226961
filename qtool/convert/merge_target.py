"""The quantization config a merged model is quantized again with: the base checkpoint's own (qtool's whole config
when qtool wrote it, else rebuilt from the GPTQ or EXL2 fields other quantizers write), or a preset of the target
format, or a --config file; then the flags. Validated like every config, errors naming where a value came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.config.schema import (
    GPTQ_ONLY_FIELDS,
    QUANTIZE_DEFAULT_PRESET,
    QUANTIZE_EXL2_PRESET,
    CalibrationConfig,
    QuantConfig,
    apply_overrides,
    config_from_dict,
    read_config_file,
    validate_config,
)
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, Level, raise_first_error
from qtool.formats.registry import QUANT_FORMATS

PRESET_OF = {"gptq": QUANTIZE_DEFAULT_PRESET, "exl2": QUANTIZE_EXL2_PRESET}
# the flag that sets each override key merge takes (for messages)
FLAG_OF = {"bits": "--bits", "group_size": "--group-size", "bpw": "--bpw", "calibration_source": "--calibration",
           "calibration_samples": "--samples", "calibration_seqlen": "--seqlen"}


@dataclass(frozen=True)
class MergeTarget:
    config: QuantConfig
    origin: str  # where the config came from, before the flags: "the base's quantization_config", a preset, a file
    findings: list[Finding]


def config_of_checkpoint(base_format: str, quantization_config: dict[str, Any], where: str) -> QuantConfig:
    """The QuantConfig a GPTQ or EXL2 checkpoint was quantized with: qtool's own copy in meta.qtool_config when
    present (every setting, calibration included), else the settings the format's config fields hold."""
    meta = quantization_config.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("qtool_config"), dict):
        return config_from_dict(meta["qtool_config"], f"{where}: meta.qtool_config")
    if base_format == "gptq":
        return _gptq_fields(quantization_config, where)
    return _exl2_fields(quantization_config, where)


def _gptq_fields(data: dict[str, Any], where: str) -> QuantConfig:
    """AutoGPTQ / GPTQModel / transformers fields; what they do not say keeps QuantConfig's (GPTQModel's) default."""
    from qtool.formats.gptq_config import parse_gptq_config

    parsed = parse_gptq_config(data, where)  # the loader's own reading: spellings, checkpoint_format, checks
    defaults = QuantConfig()
    mse = data.get("mse", 0.0)
    return QuantConfig(
        method="gptq",
        bits=parsed.bits,
        group_size=parsed.group_size,
        sym=parsed.sym,
        desc_act=parsed.desc_act,
        static_groups=bool(data.get("static_groups", defaults.static_groups)),
        true_sequential=bool(data.get("true_sequential", defaults.true_sequential)),
        damp_percent=float(data.get("damp_percent", defaults.damp_percent)),
        mse=bool(mse) if isinstance(mse, (int, float, bool)) else defaults.mse,
        checkpoint_format=parsed.checkpoint_format,
        output_format="gptq",
    )


def _exl2_fields(data: dict[str, Any], where: str) -> QuantConfig:
    """ExLlamaV2's fields: bits (the bpw), head_bits, calibration rows and length (its dataset is a name, not a
    file qtool can read: the calibration text is qtool's default unless --calibration names one)."""
    try:
        bpw = float(data["bits"])
    except (KeyError, TypeError, ValueError):
        raise QtoolError(f"{where}: the EXL2 quantization_config has no numeric bits", "pass --bpw, or --config FILE") from None
    head_bits = int(data.get("head_bits") or 0)
    calibration = data.get("calibration") if isinstance(data.get("calibration"), dict) else {}
    defaults = CalibrationConfig()
    return QuantConfig(
        output_format="exl2",
        desc_act=True,
        bpw=bpw,
        head_bits=head_bits,  # a width qtool cannot write is reported by the validator, naming the base
        calibration=CalibrationConfig(samples=int(calibration.get("rows") or defaults.samples), seqlen=int(calibration.get("length") or defaults.seqlen)),
    )


def merge_target(
    requantize: str,
    base_format: str,
    base_quantization: dict[str, Any] | None,
    base_where: str,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> MergeTarget:
    """The validated config to quantize the merged model with into `requantize` (gptq or exl2). Start: --config FILE,
    else the base's own config when the base has that format, else the format's preset with the base's calibration
    (when it has one). Then the overrides (keys of FLAG_OF; None = not given)."""
    if requantize not in QUANT_FORMATS:
        raise QtoolError(f"--requantize {requantize!r} is not a quantized format", f"use one of {', '.join(QUANT_FORMATS)}")
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(overrides) - set(FLAG_OF))
    if unknown:
        raise QtoolError(f"merge_target got unknown overrides {unknown}", f"known: {', '.join(FLAG_OF)}")
    if requantize == "exl2":
        wrong = [key for key in overrides if key in GPTQ_ONLY_FIELDS]
        if wrong:
            raise QtoolError(f"{FLAG_OF[wrong[0]]} does not apply to --requantize exl2", "EXL2 chooses widths and groups per linear: set --bpw instead")
    elif "bpw" in overrides:
        raise QtoolError("--bpw applies to --requantize exl2 only", "GPTQ has one width: set --bits (and --group-size) instead")
    base_config = config_of_checkpoint(base_format, base_quantization, base_where) if base_quantization else None
    if config_file is not None:
        start, origin = read_config_file(config_file), f"--config {config_file}"
        if start.output_format != requantize:
            raise QtoolError(f"--config {config_file} sets output_format {start.output_format} but --requantize is {requantize}",
                             f"use a {requantize} config or --requantize {start.output_format}")
    elif base_config is not None and base_format == requantize:
        start, origin = base_config, f"the base's quantization_config ({base_where})"
    else:
        start, origin = read_config_file(PRESET_OF[requantize]), f"the preset {PRESET_OF[requantize]}"
        if base_config is not None:
            start = dataclasses.replace(start, calibration=base_config.calibration)
            origin += " with the base's calibration"
    config = apply_overrides(start, overrides)
    findings = validate_config(config)
    flagged = {key.removeprefix("calibration_") for key in overrides}
    # an error in a field no flag set comes from the starting config: say which, and which flag overrides it
    findings = [f if f.level is not Level.ERROR or f.where.split(".")[-1] in flagged else _from_origin(f, origin) for f in findings]
    return MergeTarget(config, origin, raise_first_error(findings))


def _from_origin(finding: Finding, origin: str) -> Finding:
    field = finding.where.split(".")[-1]
    key = "calibration_" + field if finding.where.startswith("calibration.") else field
    flag = FLAG_OF.get(key)
    fix = f"{finding.fix}; or override it with {flag}" if flag else finding.fix
    return dataclasses.replace(finding, where=f"{origin}: {finding.where}", fix=fix)
