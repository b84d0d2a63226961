"""Tuned kernel plans kept on disk, so that a new process does not re-time every layer shape: one JSON file per
kernel fingerprint (the kernel package's source and the torch/Triton/CUDA versions), entries per GPU name and
tune key. A file that cannot be read or written costs a warning and a re-tune, never an error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from qtool.core.cache_root import cache_root

logger = logging.getLogger(__name__)

STORE_FORMAT = 1


def kernel_fingerprint(sources: Iterable[Path], versions: dict[str, str]) -> str:
    """sha256 over the kernel sources' bytes (in name order) and the library versions: a plan tuned for other
    kernels or another compiler is never reused."""
    digest = hashlib.sha256(f"format {STORE_FORMAT}\n".encode())
    for name, version in sorted(versions.items()):
        digest.update(f"{name} {version}\n".encode())
    for path in sorted(sources, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path | None:
    """tuning/ under qtool's cache root ($QTOOL_CACHE_DIR, default ~/.cache/qtool); None when caching is off."""
    root = cache_root()
    return None if root is None else root / "tuning"


def _entry_key(device_name: str, key: Any) -> str:
    # the process-local device ("cuda:1") is replaced by what the timing depends on: the GPU model
    fields = {k: v for k, v in dataclasses.asdict(key).items() if k != "device"}
    return json.dumps({"device_name": device_name, **fields}, sort_keys=True)


@dataclass
class PlanStore:
    """Plans by (GPU name, tune key) in `directory`/`prefix`-<fingerprint>.json. A plan is any object with `kind`
    and `config` (a dataclass or None); plan_types maps a kind to its config class (None: no config) and
    make_plan(kind, config) rebuilds one. Entries of unknown kinds or fields are skipped."""

    directory: Path
    fingerprint: str
    plan_types: dict[str, type | None]
    make_plan: Callable[[str, Any], Any]
    prefix: str = "gptq-plans"
    _entries: dict[str, dict] | None = field(default=None, repr=False)
    _warned: bool = field(default=False, repr=False)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.prefix}-{self.fingerprint[:24]}.json"

    def get(self, device_name: str, key: Any) -> Any | None:
        """The stored plan for `key` on a GPU of that name, or None (none stored, or it no longer parses)."""
        if self._entries is None:
            self._entries = self._read()
        entry = self._entries.get(_entry_key(device_name, key))
        if entry is None or entry["kind"] not in self.plan_types:
            return None
        config_type = self.plan_types[entry["kind"]]
        try:
            config = None if config_type is None else config_type(**entry["config"])
        except TypeError:
            return None  # fields of other code (the fingerprint should have caught it)
        return self.make_plan(entry["kind"], config)

    def put(self, device_name: str, key: Any, plan: Any) -> None:
        """Store one plan: merged into what the file holds now (other processes may have added entries), written
        to a temporary file and renamed into place."""
        entry = {"kind": plan.kind, "config": None if plan.config is None else dataclasses.asdict(plan.config)}
        entries = self._read()
        entries[_entry_key(device_name, key)] = entry
        self._entries = entries
        body = {"format": STORE_FORMAT, "fingerprint": self.fingerprint,
                "plans": [{"key": json.loads(k), **v} for k, v in sorted(entries.items())]}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "w") as out:
                    json.dump(body, out, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._warn(f"cannot write the tuned-plan cache {self.path}: {exc}; plans are re-tuned next run "
                       "(set QTOOL_CACHE_DIR to a writable directory, or to off)")

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            body = json.loads(self.path.read_text())
            if body.get("format") != STORE_FORMAT or body.get("fingerprint") != self.fingerprint:
                raise ValueError("written for other kernels")
            entries = {}
            for item in body["plans"]:
                entries[json.dumps(item["key"], sort_keys=True)] = {"kind": item["kind"], "config": item["config"]}
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._warn(f"ignoring the tuned-plan cache {self.path} ({type(exc).__name__}: {exc}); it is rewritten "
                       "as layers are tuned")
            return {}

    def _warn(self, message: str) -> None:
        if not self._warned:  # one line per store, not one per layer
            self._warned = True
            logger.warning("%s", message)
