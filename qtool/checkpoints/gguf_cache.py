"""A float copy of a GGUF model kept as a Hugging Face directory, for the files qtool's own GGUF reader does not
map (qtool.checkpoints.gguf_loader) and transformers' GGUF loader reads instead: that loader takes tens of seconds
even for a small model, so only the first load pays for it. The copy is keyed by the file's path, size and
modification time and the transformers version that dequantized it, written atomically, and used only when
complete; any problem with the cache falls back to reading the GGUF file."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from qtool.core.cache_root import cache_root
from qtool.core.output_dir import atomic_output_dir

log = logging.getLogger(__name__)

COMPLETE_MARK = "qtool-cache-complete"


def cached_float_dir(gguf_file: Path) -> Path | None:
    """Where the float copy of `gguf_file` lives (whether or not it exists yet); None when caching is off."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / "gguf-float" / f"{gguf_file.stem}-{digest}"


def is_complete(directory: Path | None) -> bool:
    return directory is not None and (directory / COMPLETE_MARK).exists()


def store_float_copy(directory: Path, model: Any, tokenizer: Any) -> None:
    """Write model (float32 safetensors) and tokenizer; a failure only costs the next load its speed."""
    try:
        with atomic_output_dir(directory, force=True) as staging:
            model.save_pretrained(str(staging))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            (staging / COMPLETE_MARK).write_text("ok\n")
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation, never a reason to fail
        log.warning("could not cache the float copy of the GGUF model in %s: %s", directory, exc)
