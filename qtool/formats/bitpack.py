"""Bit-packing of small unsigned integers into int32 words, as GPTQ and EXL2 checkpoints store them: a little-endian
bit stream along one axis, value j of a run at bit offset j*bits (3-, 5-, 6- and 7-bit values straddle words)."""

from __future__ import annotations

import math
import sys

import torch

from qtool.core.errors import QtoolError
from qtool.formats.gptq_settings import GPTQ_BITS

STREAM_BITS = tuple(range(1, 9))  # any width the stream packers take; GPTQ uses 2/3/4/8, EXL2 2..6 and 8
WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1


def values_per_block(bits: int) -> int:
    """How many values fill a whole number of words (32 for 3-bit, 32/bits otherwise)."""
    return WORD_BITS // math.gcd(bits, WORD_BITS)


def words_per_block(bits: int) -> int:
    return bits // math.gcd(bits, WORD_BITS)


def _check_bits(bits: int, allowed: tuple[int, ...], rule: str) -> None:
    if not isinstance(bits, int) or bits not in allowed:
        raise QtoolError(f"cannot pack {bits}-bit values", rule)


def _block_layout(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each value of a block: the word its low bits land in, their bit offset there, and whether the value
    spills into the next word."""
    starts = torch.arange(values_per_block(bits), dtype=torch.int64) * bits
    word = starts // WORD_BITS
    shift = starts % WORD_BITS
    spills = shift + bits > WORD_BITS
    return word, shift, spills


def words_to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << WORD_BITS), words).to(torch.int32)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    if values.dim() != 2:
        raise QtoolError(f"bit packing expects a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    block = values_per_block(bits)
    if rows % block:
        raise QtoolError(f"cannot pack {rows} rows of {bits}-bit values into whole int32 words", f"the row count must be a multiple of {block}")
    if values.is_floating_point():
        raise QtoolError(f"bit packing expects integer codes, got {values.dtype}")
    if values.numel():
        low_value, high_value = torch.aminmax(values)
        if int(low_value) < 0 or int(high_value) >= 1 << bits:
            raise QtoolError(f"values out of range for {bits}-bit packing: min {int(low_value)}, max {int(high_value)}",
                             f"values must lie in 0..{(1 << bits) - 1}")
    n_words = words_per_block(bits)
    if n_words == 1 and sys.byteorder == "little" and cols > 1 and values.stride(0) == 1 and values.stride(1) == rows:
        # The transpose of a contiguous [cols, rows] tensor (GPTQ's codes are [out, in], packed along in): packed
        # along its own contiguous rows, then the int32 words transposed, a third of the time of the strided
        # gather below on a 7B layer.
        per_byte = 8 // bits
        fields = values.T.reshape(cols, rows // per_byte, per_byte)
        packed_bytes = fields[:, :, 0].to(torch.uint8, copy=True)
        for i in range(1, per_byte):
            packed_bytes |= fields[:, :, i].to(torch.uint8) << (i * bits)
        return packed_bytes.view(torch.int32).T.contiguous()
    if n_words == 1 and sys.byteorder == "little":
        # No value straddles a word (2, 4, 8 bits): the fields are gathered into bytes, and four consecutive bytes
        # are the word (little-endian), in uint8 throughout, a fraction of the general path's time on a 7B layer.
        per_byte = 8 // bits
        fields = values.reshape(rows // block, WORD_BITS // 8, per_byte, cols)  # a transposed view reads as it is
        packed_bytes = fields[:, :, 0].to(torch.uint8, copy=True)  # ORed into below: never the caller's uint8 codes
        for i in range(1, per_byte):
            packed_bytes |= fields[:, :, i].to(torch.uint8) << (i * bits)
        words = torch.empty(rows // block, cols, WORD_BITS // 8, dtype=torch.uint8, device=values.device)
        words.copy_(packed_bytes.permute(0, 2, 1))  # a fresh tensor: strides a dtype view accepts, size-1 dims too
        return words.view(torch.int32).squeeze(-1)
    word, shift, spills = _block_layout(bits)
    v = values.to(torch.int64).reshape(rows // block, block, cols)
    # Bit fields never overlap, so adding the shifted parts is the same as OR-ing them.
    words = torch.zeros(rows // block, n_words, cols, dtype=torch.int64, device=values.device)
    low = (v << shift.to(v.device)[None, :, None]) & _WORD_MASK
    words.index_add_(1, word.to(v.device), low)
    if bool(spills.any()):
        spill_idx = spills.nonzero().flatten().to(v.device)
        high = v[:, spill_idx] >> (WORD_BITS - shift.to(v.device)[spill_idx])[None, :, None]
        words.index_add_(1, word.to(v.device)[spill_idx] + 1, high)
    return words_to_int32(words.reshape(rows // block * n_words, cols))


def _unpack(packed: torch.Tensor, bits: int, num_rows: int) -> torch.Tensor:
    block, n_words = values_per_block(bits), words_per_block(bits)
    if packed.dim() != 2 or num_rows % block or packed.shape[0] * block != num_rows * n_words:
        raise QtoolError(
            f"packed words of shape {tuple(packed.shape)} cannot hold {num_rows} rows of {bits}-bit values",
            f"expected {num_rows * bits // WORD_BITS} packed rows and a row count that is a multiple of {block}",
        )
    cols = packed.shape[1]
    mask = (1 << bits) - 1
    if n_words == 1:
        # No value straddles a word: one broadcast shift. An arithmetic shift of int32 is fine, the mask drops
        # the sign bits.
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)
        values = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & mask
        return values.reshape(num_rows, cols)
    words = (packed.to(torch.int64) & _WORD_MASK).reshape(num_rows // block, n_words, cols)
    word, shift, spills = _block_layout(bits)
    values = words[:, word.to(packed.device)] >> shift.to(packed.device)[None, :, None]
    # Values that straddle two words take their high bits from the start of the next word.
    for j in spills.nonzero().flatten().tolist():
        values[:, j] |= words[:, int(word[j]) + 1] << (WORD_BITS - int(shift[j]))
    return (values & mask).to(torch.int32).reshape(num_rows, cols)


def pack_bitstream_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values int [R, C] in 0..2**bits-1, bits 1..8 -> int32 [R*bits/32, C]: each column a little-endian bit
    stream, value j at bit j*bits (R a multiple of values_per_block(bits)). EXL2 packs each group so."""
    _check_bits(bits, STREAM_BITS, "bit widths run from 1 to 8")
    return _pack(values, bits)


def unpack_bitstream_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 [rows*bits/32, C] -> int32 [rows, C]; the inverse of pack_bitstream_rows."""
    _check_bits(bits, STREAM_BITS, "bit widths run from 1 to 8")
    return _unpack(packed, bits, rows)


# GPTQ's layouts are the same stream, refused for widths GPTQ does not have (a 5-bit qweight is a bug upstream).
_GPTQ_RULE = f"GPTQ bits must be one of {', '.join(map(str, GPTQ_BITS))}"


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values int [K, N] in 0..2**bits-1 -> int32 [K*bits/32, N], packed along K (GPTQ qweight layout)."""
    _check_bits(bits, GPTQ_BITS, _GPTQ_RULE)
    return _pack(values, bits)


def unpack_rows(packed: torch.Tensor, bits: int, num_rows: int) -> torch.Tensor:
    """int32 [num_rows*bits/32, N] -> int32 [num_rows, N] values; the inverse of pack_rows."""
    _check_bits(bits, GPTQ_BITS, _GPTQ_RULE)
    return _unpack(packed, bits, num_rows)


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values int [G, N] -> int32 [G, N*bits/32], packed along N (GPTQ qzeros layout)."""
    return pack_rows(values.T, bits).T.contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, num_columns: int) -> torch.Tensor:
    """int32 [G, num_columns*bits/32] -> int32 [G, num_columns]; the inverse of pack_columns."""
    return unpack_rows(packed.T, bits, num_columns).T.contiguous()
