"""`qtool validate`'s entry point: what kind of path it was given (a config file or preset, a float model
directory, a GPTQ or EXL2 checkpoint), read once and handed to the checker for that kind."""

from __future__ import annotations

import difflib
from collections import Counter
from pathlib import Path
from typing import Any

from qtool.config.schema import CONFIG_SUFFIXES, PRESETS_DIR, QuantConfig, preset_names
from qtool.core.errors import QtoolError
from qtool.core.findings import warning
from qtool.validate.config_file import validate_config_file
from qtool.validate.report import ValidationReport


def validate_path(path: str | Path, config_file: str | Path | None = None, device: str = "auto") -> ValidationReport:
    """Validate a config file or preset name, or a model directory (quantized or float). Raises QtoolError when
    PATH is neither."""
    path = Path(path)
    if path.is_dir():
        return _validate_directory(path, config_file, device)
    if path.is_file() and path.suffix not in CONFIG_SUFFIXES:
        raise QtoolError(f"{path} is neither a config file nor a model directory", "pass a .yaml/.json/.toml config, a preset name, or a checkpoint directory")
    if path.exists() or path.suffix in CONFIG_SUFFIXES or (PRESETS_DIR / f"{path.name}.yaml").exists():
        return validate_config_file(path)
    close = difflib.get_close_matches(path.name, preset_names(), n=1)
    guess = f"did you mean the preset '{close[0]}'? " if close else ""
    raise QtoolError(f"{path} does not exist", f"{guess}pass a model directory, a config file or a preset: {', '.join(preset_names())}")


def _validate_directory(path: Path, config_file: str | Path | None, device: str) -> ValidationReport:
    # The checkers of directories read tensors with torch; imported here so that validating a config file (the
    # branch above) stays torch-free and fast.
    from qtool.formats.safetensors_header import INDEX_NAME, read_checkpoint_headers
    from qtool.validate.directory_configs import LEGACY_QUANT_FILE, read_directory_configs
    from qtool.validate.exl2 import add_exl2_findings
    from qtool.validate.float_model import float_model_report
    from qtool.validate.gptq import add_gptq_findings
    from qtool.validate.quantization_config import check_quantization_config
    from qtool.validate.model_tensors import model_tensor_findings

    has_model_files = any((path / n).exists() for n in ("config.json", LEGACY_QUANT_FILE, INDEX_NAME)) or any(path.glob("*.safetensors"))
    if not has_model_files:
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"{ggufs[0].name} is a GGUF file: qtool validate checks safetensors checkpoints" if ggufs else "pass a Hugging Face model directory or a config file"
        raise QtoolError(f"{path} is not a model directory: no config.json and no *.safetensors", hint)
    configs = read_directory_configs(path)
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
        return float_model_report(path, configs.hf_config, tensors, findings, summary, config_file, device)
    report = ValidationReport("checkpoint", str(path), findings, summary)
    report.findings += model_tensor_findings(configs.hf_config, tensors, check_missing=False)
    readable = {h.file for h in headers if h.readable}
    if declares_exl2:
        add_exl2_findings(report, path, configs, tensors, readable)
    else:
        add_gptq_findings(report, path, configs, quant_config, tensors, readable)
    return _with_config_file_warning(report, config_file)


def _with_config_file_warning(report: ValidationReport, config_file: str | Path | None) -> ValidationReport:
    if config_file is not None:
        report.findings.append(warning("--config", "only applies to float models: this checkpoint is already quantized", "drop --config"))
    return report
