"""Text for evaluation and calibration: WikiText-2 through `datasets` when it is cached or reachable, else a
local text file; calibration windows drawn from it reproducibly."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from qtool.core.errors import QtoolError

WIKITEXT = "wikitext"
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
TEST_FILE_HINT = "../shared/data/wikitext-2-raw/wiki.test.raw"
CALIBRATION_FILE_HINT = "../shared/data/wikitext-2/wiki.valid.tokens"
PROBE_TIMEOUT_S = 3.0


def join_wikitext_rows(rows: list[str]) -> str:
    """The split as one text. Each Hugging Face row already ends with its newline (empty rows are blank lines),
    so concatenation gives back the raw file: the same text as wiki.test.raw read as a file."""
    return "".join(rows)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` (datasets would otherwise retry for ~30 s)."""
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_wikitext_split(split: str, option: str, file_hint: str) -> str:
    """One split of wikitext-2-raw-v1 through `datasets`: from its cache when HF_DATASETS_OFFLINE/HF_HUB_OFFLINE
    is set, else from the Hub if it answers; any failure is one QtoolError naming the file to pass instead."""
    import datasets.config
    from datasets import load_dataset

    hint = f"pass the text file instead, e.g. `{option} {file_hint}`"
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if not offline and not hub_reachable():
        raise QtoolError(
            f"{option} {WIKITEXT}: the Hugging Face Hub cannot be reached, so {WIKITEXT_CONFIG} ({split}) cannot be downloaded",
            hint + ", or set HF_DATASETS_OFFLINE=1 to use a cached copy",
        )
    try:
        dataset = load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, split=split)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError... for the same cause
        reason = "it is not in the local cache (offline mode is set)" if offline else f"loading it failed ({type(exc).__name__})"
        raise QtoolError(f"{option} {WIKITEXT}: {WIKITEXT_CONFIG} ({split}) is unavailable: {reason}", hint) from exc
    return join_wikitext_rows(list(dataset["text"]))


def read_text_file(path: str | Path, option: str) -> str:
    """A UTF-8 text file (any newline convention, read as \\n); missing, unreadable or empty files are errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise QtoolError(f"{option} {path}: no such file", f"pass a text file, or `{WIKITEXT}`")
    if not path.is_file():
        raise QtoolError(f"{option} {path}: not a regular file", "pass a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QtoolError(f"{option} {path}: not UTF-8 text (byte {exc.start})", "pass a plain UTF-8 text file") from exc
    except OSError as exc:
        raise QtoolError(f"{option} {path}: cannot be read ({exc.strerror})", "check the file's permissions") from exc
    if not text.strip():
        raise QtoolError(f"{option} {path}: the file is empty", "pass a file holding the evaluation text")
    return text


def load_eval_text(source: str | Path, option: str = "--perplexity") -> str:
    """The evaluation text: `wikitext` is the wikitext-2-raw-v1 test split; anything else is a file path."""
    if str(source) == WIKITEXT:
        return load_wikitext_split("test", option, TEST_FILE_HINT)
    return read_text_file(source, option)


def load_calibration_text(source: str | Path, option: str = "--calibration") -> str:
    """Calibration text: `wikitext` is the wikitext-2-raw-v1 train split (disjoint from the test split)."""
    if str(source) == WIKITEXT:
        return load_wikitext_split("train", option, CALIBRATION_FILE_HINT)
    return read_text_file(source, option)


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one int64 id sequence, tokenized once; no BOS/EOS added (the protocol inserts none)."""
    # verbose=False: the text is far longer than model_max_length on purpose, windows are cut afterwards.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(tokenizer: Any, source: str | Path, samples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """`samples` windows of `seqlen` token ids (int64) starting at random offsets of the tokenized text; the same
    seed gives the same windows."""
    if samples < 1:
        raise QtoolError(f"--samples {samples} must be at least 1", "128 is the usual GPTQ calibration size")
    if seqlen < 1:
        raise QtoolError(f"--seqlen {seqlen} must be at least 1", "2048 is the usual calibration length")
    ids = tokenize_text(tokenizer, load_calibration_text(source))
    if ids.numel() < seqlen:
        raise QtoolError(f"--calibration {source}: the text has {ids.numel()} tokens, fewer than --seqlen {seqlen}", "pass a longer text or a smaller --seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=generator)
    return [ids[start : start + seqlen].clone() for start in starts.tolist()]
