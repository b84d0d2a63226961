"""`qtool validate` on a config file or a preset name: read it (what is wrong inside becomes a finding) and
check it with qtool's config rules."""

from __future__ import annotations

from pathlib import Path

from qtool.config.schema import PRESETS_DIR, QuantConfig, read_config_file, validate_config
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding
from qtool.validate.report import ValidationReport, finding_from_error


def read_config(path: str | Path) -> tuple[QuantConfig | None, list[Finding]]:
    """A config file or preset; what is wrong inside it becomes a finding, a file that is not there raises."""
    path = Path(path)
    if not path.exists() and not (path.suffix == "" and (PRESETS_DIR / f"{path.name}.yaml").exists()):
        read_config_file(path)  # raises its "does not exist", with a did-you-mean for presets
    try:
        return read_config_file(path), []
    except QtoolError as exc:
        return None, [finding_from_error(exc, str(path))]


def validate_config_file(path: Path) -> ValidationReport:
    config, findings = read_config(path)
    if config is None:
        return ValidationReport("config", str(path), findings)
    return ValidationReport("config", str(path), validate_config(config), config.to_dict())
