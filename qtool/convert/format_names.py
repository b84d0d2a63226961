"""The formats `qtool convert` reads and writes, by name (its SRC_FORMAT and DST_FORMAT choices): plain text
without torch, so that the CLI builds its arguments without importing the conversions."""

from __future__ import annotations

from qtool.formats.registry import QUANT_FORMATS

SOURCE_FORMATS = tuple(QUANT_FORMATS)
TARGET_FORMATS = ("gptq", "exl2", "float")
