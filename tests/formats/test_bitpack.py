"""Bit packing: round trips, and the layout checked bit by bit against packers written here from the format
description (a little-endian bit stream per column) and from GPTQModel's explicit 3-bit word formulas; the
streams of every width 1..8 (EXL2's groups) as well as GPTQ's 2/3/4/8."""

import numpy as np
import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.formats.bitpack import pack_bitstream_rows, pack_columns, pack_rows, unpack_bitstream_rows, unpack_columns, unpack_rows

BITS = (2, 3, 4, 8)


def bitwise_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference packer, one bit at a time: bit t of row i lands at stream position i*bits+t of its column."""
    rows, cols = values.shape
    words = [[0] * cols for _ in range(rows * bits // 32)]
    for c in range(cols):
        for i in range(rows):
            value = int(values[i, c])
            for t in range(bits):
                position = i * bits + t
                words[position // 32][c] |= ((value >> t) & 1) << (position % 32)
    as_signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]
    return torch.tensor(as_signed, dtype=torch.int32)


def random_codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int32)
    values[0, 0], values[-1, -1] = 0, (1 << bits) - 1  # both extremes, incl. the sign bit of the last word
    return values


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,cols", [(32, 32), (96, 160), (224, 96)])
def test_round_trip(bits, rows, cols):
    values = random_codes(rows, cols, bits, seed=rows * 7 + bits)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (rows * bits // 32, cols)
    assert torch.equal(unpack_rows(packed, bits, rows), values)
    packed_cols = pack_columns(values, bits)
    assert packed_cols.dtype == torch.int32 and tuple(packed_cols.shape) == (rows, cols * bits // 32)
    assert torch.equal(unpack_columns(packed_cols, bits, cols), values)


@pytest.mark.parametrize("bits", BITS)
def test_rows_match_bitwise_reference(bits):
    values = random_codes(96, 5, bits, seed=bits)
    assert torch.equal(pack_rows(values, bits), bitwise_pack_rows(values, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_a_transposed_view_of_any_integer_dtype_packs_as_the_reference(bits, dtype):
    """pack_rows reads a transposed view (how codes [N, K] are packed along K) and narrow or wide integer codes as
    they are; the values are untouched."""
    rows, cols = 32 * (1 + int(torch.randint(0, 3, ()))), int(torch.randint(1, 7, ()))
    codes = random_codes(cols, rows, bits, seed=int(torch.randint(0, 1 << 30, ()))).to(dtype)  # [N, K]
    before = codes.clone()
    assert torch.equal(pack_rows(codes.T, bits), bitwise_pack_rows(codes.T.to(torch.int32), bits))
    assert torch.equal(codes, before)


@pytest.mark.parametrize("bits", BITS)
def test_columns_match_bitwise_reference(bits):
    values = random_codes(3, 64, bits, seed=10 + bits)
    assert torch.equal(pack_columns(values, bits), bitwise_pack_rows(values.T, bits).T)


def test_three_bit_matches_gptqmodel_word_formulas():
    """GPTQModel packs 32 3-bit rows into 3 words: 10 values, 2 low bits of the 11th | its top bit, 10 values,
    the low bit of the 22nd | its 2 top bits, 10 values."""
    x = random_codes(32, 7, 3, seed=3).to(torch.int64)
    mask = (1 << 32) - 1
    a = sum(x[i] << (3 * i) for i in range(10)) | ((x[10] << 30) & mask)
    b = ((x[10] >> 2) & 1) | sum(x[11 + i] << (3 * i + 1) for i in range(10)) | ((x[21] << 31) & mask)
    c = ((x[21] >> 1) & 3) | sum(x[22 + i] << (3 * i + 2) for i in range(10))
    expected = torch.stack([a, b, c]) & mask
    assert torch.equal(pack_rows(x, 3).to(torch.int64) & mask, expected)


def test_word_with_top_bit_set_is_a_negative_int32():
    values = torch.full((8, 1), 15, dtype=torch.int32)
    assert int(pack_rows(values, 4)[0, 0]) == -1


@pytest.mark.parametrize("bits,rows", [(3, 16), (4, 12), (2, 8)])
def test_row_count_not_a_whole_block_is_refused(bits, rows):
    with pytest.raises(QtoolError, match="multiple of"):
        pack_rows(torch.zeros(rows, 4, dtype=torch.int32), bits)


def test_out_of_range_values_are_refused():
    values = torch.zeros(32, 2, dtype=torch.int32)
    values[3, 1] = 16
    with pytest.raises(QtoolError, match="out of range"):
        pack_rows(values, 4)
    with pytest.raises(QtoolError, match="out of range"):
        pack_rows(-values, 4)


def test_unsupported_bits_and_wrong_row_count_are_refused():
    with pytest.raises(QtoolError, match="5-bit"):
        pack_rows(torch.zeros(32, 2, dtype=torch.int32), 5)
    packed = pack_rows(torch.zeros(64, 2, dtype=torch.int32), 4)
    with pytest.raises(QtoolError, match="cannot hold 96 rows"):
        unpack_rows(packed, 4, 96)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitstream_round_trip_every_width(bits):
    gen = torch.Generator().manual_seed(bits)
    rows = 64 if bits != 7 else 32  # any multiple of 32 fills whole words
    values = torch.randint(0, 1 << bits, (rows, 13), generator=gen)
    packed = pack_bitstream_rows(values, bits)
    assert packed.shape == (rows * bits // 32, 13) and packed.dtype == torch.int32
    assert torch.equal(unpack_bitstream_rows(packed, bits, rows), values.to(torch.int32))
    # value j sits at bit j*bits of its column's stream
    words = packed.numpy().view(np.uint32).astype(np.uint64)
    j, col = rows - 1, 5
    value = sum(int((words[(j * bits + t) // 32, col] >> np.uint64((j * bits + t) % 32)) & np.uint64(1)) << t for t in range(bits))
    assert value == int(values[j, col])


def test_top_bit_words_survive():
    """All-ones fields fill the sign bit of int32 words."""
    for bits in (2, 3, 4, 5, 6, 8):
        values = torch.full((32, 3), (1 << bits) - 1)
        packed = pack_bitstream_rows(values, bits)
        assert bool((packed == -1).all())
        assert torch.equal(unpack_bitstream_rows(packed, bits, 32), values.to(torch.int32))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitstream_matches_bitwise_reference(bits):
    values = random_codes(64 if bits != 7 else 32, 5, bits, seed=20 + bits)
    assert torch.equal(pack_bitstream_rows(values, bits), bitwise_pack_rows(values, bits))


def test_gptq_layout_refuses_what_only_the_stream_packs():
    values = torch.zeros(32, 2, dtype=torch.int32)
    assert pack_bitstream_rows(values, 5).shape == (5, 2)
    with pytest.raises(QtoolError, match="GPTQ bits must be one of 2, 3, 4, 8"):
        unpack_rows(pack_bitstream_rows(values, 5), 5, 32)
    with pytest.raises(QtoolError, match="9-bit"):
        pack_bitstream_rows(values, 9)
