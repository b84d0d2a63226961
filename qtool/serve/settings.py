"""How `qtool serve` runs: where it listens, who may call it, and the limits every request is held to. Torch-free, so
the CLI checks the flags before any model loads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from qtool.core.errors import QtoolError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer token every call but /health must carry (None: no auth, loopback only)
    max_body_bytes: int = 1 << 20  # a larger request body is refused with 413
    max_tokens_limit: int = 4096  # the most max_tokens a request may ask; also the default, cut at the context
    max_n: int = 8  # the most choices (n) one request may ask
    drain_timeout_s: float = 30.0  # on Ctrl-C / SIGTERM, how long in-flight requests may still run
    # of each engine step's wall time, the event loop's CPU time streams may take before their text is sent every
    # few steps instead of every step (serve/stream_pacing.py); 1.0: always every step
    stream_cpu_budget: float = 0.05
    arena_votes: str | None = None  # the studio's arena votes file (JSONL, appended); None: ./arena-votes.jsonl

    def check(self) -> None:
        """One-line errors for unsafe or impossible settings: any address but loopback needs an API key."""
        if not is_loopback(self.host) and not self.api_key:
            raise QtoolError(f"--host {self.host} exposes the server beyond this machine without an API key",
                             "pass --api-key KEY (or set QTOOL_API_KEY), or keep --host 127.0.0.1")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise QtoolError(f"--port {self.port} is invalid", "give a port in 0..65535 (0: any free port)")
        for name, value in (("max_body_bytes", self.max_body_bytes), ("max_tokens_limit", self.max_tokens_limit),
                            ("max_n", self.max_n)):
            if not isinstance(value, int) or value < 1:
                raise QtoolError(f"serve setting {name}={value!r} is invalid", f"{name} must be an int >= 1")
        if not isinstance(self.stream_cpu_budget, (int, float)) or not 0 < self.stream_cpu_budget <= 1:
            raise QtoolError(f"serve setting stream_cpu_budget={self.stream_cpu_budget!r} is invalid",
                             "give a fraction in (0, 1] (1: stream every step's text)")
        if self.api_key is not None and not self.api_key.strip():
            raise QtoolError("--api-key is empty", "give a non-empty key, or none for a loopback-only server")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False
