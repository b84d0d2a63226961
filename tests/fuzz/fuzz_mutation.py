"""One malformed input: the bytes that replace a valid file and what was done to them (Hypothesis prints it for a
failing example; regression files keep it as their note)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    description: str
    content: bytes
    # True where the change is invalid by the format's own rules whatever an oracle says (a wrong type, an
    # unknown key): then exit 0 is a failure even if a lenient parser still reads the file
    must_fail: bool = False

    def __repr__(self) -> str:  # Hypothesis shows this for a failing example; the bytes would drown it
        return f"Mutation({self.description!r}, {len(self.content)} bytes, must_fail={self.must_fail})"
