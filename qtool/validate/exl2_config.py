"""Check an EXL2 checkpoint's quantization_config (bits, head_bits, version) as ExLlamaV2's converter writes it,
and against what the tensors store when they could be counted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qtool.checkpoints.footprint import exl2_bits_per_weight, exl2_head_code_bits
from qtool.config.schema import EXL2_BPW_RANGE, EXL2_HEAD_BITS
from qtool.core.findings import Finding, error, warning
from qtool.formats.safetensors_header import TensorHeader

VERSION_PATTERN = re.compile(r"^\d+(\.\d+)*([+-].*)?$")  # "0.3.2", "0.2.8+cu121.torch2.4.0"


@dataclass(frozen=True)
class Exl2Stored:
    """What an EXL2 checkpoint's tensors store, from their headers: the bits per weight of its linears but the
    head (as ExLlamaV2 counts them) and the head's mean code width (None: the head stays float)."""

    bits_per_weight: float | None
    head_code_bits: float | None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_exl2_quantization_config(data: dict[str, Any], where: str, stored: Exl2Stored | None = None) -> list[Finding]:
    """bits (bits per weight), head_bits and version as ExLlamaV2's converter writes them; with `stored`, bits
    and head_bits are also held against what the tensors store."""
    return _check_exl2_bits(data, where, stored) + _check_exl2_head_bits(data, where, stored) + _check_exl2_version(data, where)


def _check_exl2_bits(data: dict[str, Any], where: str, stored: Exl2Stored | None) -> list[Finding]:
    """ExLlamaV2 writes its target, 2.0 to 8.0; qtool's converter writes what the linears store (rounded to
    0.01), which goes past 8.0 for 8-bit codes (their scales and permutation add to the 8 bits)."""
    key, (low, high) = f"{where}.bits", EXL2_BPW_RANGE
    if "bits" not in data:
        return [error(key, "is missing", f'add "bits": the bits per weight the checkpoint was quantized to ({low} to {high})')]
    bits = data["bits"]
    if not _is_number(bits):
        return [error(key, f"must be a number, got {bits!r}", "write the bits per weight as a number, e.g. 4.0")]
    measured = stored.bits_per_weight if stored is not None else None
    if low <= bits <= high or (measured is not None and abs(bits - measured) <= 0.005):  # NaN fails both
        return []
    told = f"; its linears store {measured:.2f}" if measured is not None else ""
    return [error(key, f"{bits} is out of range", f"EXL2 stores {low} to {high} bits per weight{told}")]


def _check_exl2_head_bits(data: dict[str, Any], where: str, stored: Exl2Stored | None) -> list[Finding]:
    """ExLlamaV2 quantizes a head at 6 or 8 bits and qtool writes 0 for a float head; qtool's converter writes a
    quantized head's mean code width, whatever it is. Loaders go by the tensors: a value they contradict only
    misleads (a warning)."""
    key, valid = f"{where}.head_bits", ", ".join(map(str, EXL2_HEAD_BITS))
    if "head_bits" not in data:
        return [warning(key, "is missing", f"add head_bits: 0 when the head stays float, else its bits (valid: {valid})")]
    value = data["head_bits"]
    if not _is_number(value):
        return [error(key, f"must be a number, got {value!r}", f"valid: {valid} (0: the head stays float)")]
    if stored is None:
        return [] if value in EXL2_HEAD_BITS else [error(key, f"{value!r} is not valid", f"valid: {valid} (0: the head stays float)")]
    width = stored.head_code_bits
    actual = 0 if width is None else round(width)
    if value == actual:
        return []
    held = "the head stays float" if width is None else f"the head's codes take {round(width, 2):g} bits"
    if value in EXL2_HEAD_BITS:
        return [warning(key, f"is {value!r} but {held}", f"set head_bits {actual}")]
    return [error(key, f"{value!r} is not valid and {held}", f"set head_bits {actual}; valid: {valid}, or the code width of a quantized head")]


def _check_exl2_version(data: dict[str, Any], where: str) -> list[Finding]:
    key, example = f"{where}.version", "e.g. \"0.3.2\""
    if "version" not in data:
        return [warning(key, "is missing", f"add the ExLlamaV2 version whose layout the tensors follow, {example}")]
    value = data["version"]
    if not isinstance(value, str) or not VERSION_PATTERN.match(value):
        return [error(key, f"{value!r} is not a version", f"write the ExLlamaV2 version as a string, {example}")]
    return []


def exl2_stored(tensors: dict[str, TensorHeader]) -> Exl2Stored:
    """Bits per weight and head width from the headers, counted as `qtool eval`'s footprint counts them (the
    count trusts the shapes: only for linears that passed their checks)."""
    return Exl2Stored(exl2_bits_per_weight(tensors), exl2_head_code_bits(tensors))
