"""The report `qtool validate` gives for one path, and the finding a QtoolError of qtool's readers becomes;
every checker of this package fills one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, error, has_errors


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



def finding_from_error(exc: QtoolError, where: str) -> Finding:
    """A QtoolError of one of qtool's readers or checks as a finding; its message starts with `where`, which is
    dropped, so that the finding's line is the error's line."""
    message = exc.message.removeprefix(where).lstrip(":. ") if exc.message.startswith(where) else exc.message
    return error(where, message, exc.hint or "")
