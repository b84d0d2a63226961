"""Where qtool keeps what it can rebuild (float copies of GGUF models, tuned kernel plans): one root for all of it,
so one variable moves or disables every cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path | None:
    """$QTOOL_CACHE_DIR, else $XDG_CACHE_HOME/qtool (~/.cache/qtool); QTOOL_CACHE_DIR=off disables the caches."""
    configured = os.environ.get("QTOOL_CACHE_DIR")
    if configured is not None and configured.strip().lower() in ("", "0", "off", "none"):
        return None
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtool"
