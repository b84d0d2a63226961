"""Regression files: each failing case the fuzzer found, minimised, kept under regressions/<kind>/ as the malformed
bytes (<name>.bin) and a one-line note of what it broke (<name>.txt); read back for the replay test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fuzz_mutation import Mutation

REGRESSIONS = Path(__file__).resolve().parent / "regressions"


@dataclass(frozen=True)
class Regression:
    kind: str
    name: str
    mutation: Mutation


def regressions() -> list[Regression]:
    found = []
    for content in sorted(REGRESSIONS.glob("*/*.bin")):
        note = content.with_suffix(".txt").read_text().strip()
        found.append(Regression(content.parent.name, content.stem, Mutation(note, content.read_bytes())))
    return found
