"""The dtypes a model can be loaded in, by name (--dtype's choices): plain text without torch, so that the CLI
builds its options without importing it; sources.py maps each name to its torch dtype."""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")
