"""A finding of a check (config validation, checkpoint validation): its level, where it is, what is wrong and
the fix. Every validator in qtool reports a list of these; the CLI renders them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Level(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    level: Level
    where: str  # the option, file or tensor the finding is about
    message: str
    fix: str = ""

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}"
        return f"{text} ({self.fix})" if self.fix else text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["level"] = self.level.value
        return data


def error(where: str, message: str, fix: str = "") -> Finding:
    return Finding(Level.ERROR, where, message, fix)


def warning(where: str, message: str, fix: str = "") -> Finding:
    return Finding(Level.WARNING, where, message, fix)


def info(where: str, message: str, fix: str = "") -> Finding:
    return Finding(Level.INFO, where, message, fix)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level is Level.ERROR for f in findings)


def raise_first_error(findings: list[Finding]) -> list[Finding]:
    """Raise the first error as a QtoolError (where: message, with its fix as hint); else return the findings."""
    from qtool.core.errors import QtoolError

    first = next((f for f in findings if f.level is Level.ERROR), None)
    if first is not None:
        raise QtoolError(f"{first.where}: {first.message}", first.fix or None)
    return findings
