"""Mutations of raw bytes shared by every kind: truncation at any offset, bit flips in a region, and a
little-endian integer field overwritten with an extreme value."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from fuzz_mutation import Mutation

# Values a corrupted or hostile count/length field takes: zero, off by one, sign bit, the maxima of each width.
EXTREME_U64 = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
EXTREME_U32 = (0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1)


def truncations(data: bytes) -> st.SearchStrategy[Mutation]:
    """The file cut at any offset (empty file included); offsets in the first 4 KiB (the headers) are drawn
    as often as the rest."""
    head = st.integers(0, min(len(data), 4096) - 1)
    anywhere = st.integers(0, len(data) - 1)
    return st.one_of(head, anywhere).map(lambda at: Mutation(f"truncated to {at} bytes", data[:at]))


def bit_flips(data: bytes, start: int, end: int) -> st.SearchStrategy[Mutation]:
    """One to four bits flipped in data[start:end]."""
    positions = st.lists(st.tuples(st.integers(start, end - 1), st.integers(0, 7)), min_size=1, max_size=4, unique=True)

    def flip(bits: list[tuple[int, int]]) -> Mutation:
        mutated = bytearray(data)
        for offset, bit in bits:
            mutated[offset] ^= 1 << bit
        return Mutation(f"bits flipped at {sorted(bits)}", bytes(mutated))

    return positions.map(flip)


def overwrite_int(data: bytes, offset: int, fmt: str, value: int, what: str) -> Mutation:
    mutated = bytearray(data)
    struct.pack_into(fmt, mutated, offset, value)
    return Mutation(f"{what} set to {value}", bytes(mutated))
