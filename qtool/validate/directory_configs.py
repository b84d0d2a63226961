"""What the JSON files of a model directory say: config.json's model config and quantization_config, or an
older AutoGPTQ quantize_config.json, and where the two disagree."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, error
from qtool.core.json_file import read_json_file
from qtool.validate.quantization_config import QUANT_KEYS

LEGACY_QUANT_FILE = "quantize_config.json"


def read_json(path: Path) -> tuple[dict[str, Any] | None, list[Finding]]:
    """The JSON object in `path`, or None and the finding (named by the file's name) the shared reader gives."""
    try:
        return read_json_file(path, "restore or re-create the file"), []
    except QtoolError as exc:
        return None, [error(path.name, exc.message.removeprefix(str(path)).lstrip(), exc.hint or "")]


def compare_quant_files(main: dict[str, Any], legacy: dict[str, Any]) -> list[Finding]:
    found = []
    for key in ("quant_method", *QUANT_KEYS):
        if key in main and key in legacy and main[key] != legacy[key]:
            found.append(error(
                f"{LEGACY_QUANT_FILE}:{key}",
                f"is {legacy[key]!r} but config.json says {main[key]!r}",
                "make the two files agree (loaders read config.json first)",
            ))
    return found


@dataclass
class DirectoryConfigs:
    """What the JSON files of a model directory say: the model config and the quantization config (and where
    it came from)."""

    hf_config: dict[str, Any] | None = None
    quant_data: Any = None
    quant_where: str = ""
    findings: list[Finding] = field(default_factory=list)


def read_directory_configs(path: Path) -> DirectoryConfigs:
    read = DirectoryConfigs()
    if (path / "config.json").exists():
        read.hf_config, read.findings = read_json(path / "config.json")
    else:
        read.findings.append(error("config.json", "is missing", "copy the model's config.json into the directory"))
    legacy = None
    if (path / LEGACY_QUANT_FILE).exists():
        legacy, legacy_findings = read_json(path / LEGACY_QUANT_FILE)
        read.findings += legacy_findings
    if read.hf_config is not None and "quantization_config" in read.hf_config:
        read.quant_data, read.quant_where = read.hf_config["quantization_config"], "config.json:quantization_config"
        if isinstance(legacy, dict) and isinstance(read.quant_data, dict):
            read.findings += compare_quant_files(read.quant_data, legacy)
    elif isinstance(legacy, dict):  # older AutoGPTQ: no quant_method, and only this file
        read.quant_data, read.quant_where = {"quant_method": "gptq", **legacy}, LEGACY_QUANT_FILE
    return read
