"""Structural mutations of a valid GGUF file: truncation, bit flips in the header, every count, length, type and
offset field of the header (found by walking it) set to extreme values, and scalar metadata values (layer count,
widths, alignment) made huge or zero."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from fuzz_bytes import EXTREME_U32, EXTREME_U64, bit_flips, overwrite_int, truncations
from fuzz_mutation import Mutation

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    """One integer field of the header: where it is, its struct format, and what it is."""

    offset: int
    fmt: str
    what: str


def header_fields(data: bytes) -> tuple[list[Field], int]:
    """Every count, length, type and offset field of a well-formed GGUF header, and where the header ends."""
    fields = [Field(4, "<I", "version"), Field(8, "<Q", "tensor count"), Field(16, "<Q", "key-value count")]
    position = 24

    def u(fmt: str) -> int:
        nonlocal position
        (value,) = struct.unpack_from(fmt, data, position)
        position += struct.calcsize(fmt)
        return value

    def string(what: str) -> str:
        nonlocal position
        fields.append(Field(position, "<Q", f"length of {what}"))
        length = u("<Q")
        text = data[position : position + length].decode()
        position += length
        return text

    def value(value_type: int, key: str) -> None:
        nonlocal position
        if value_type in SCALAR_SIZES:
            if value_type in (4, 5, 10, 11):  # integer metadata: layer counts, widths, token ids, alignment
                fields.append(Field(position, {4: "<I", 5: "<I", 10: "<Q", 11: "<Q"}[value_type], f"value of {key}"))
            position += SCALAR_SIZES[value_type]
        elif value_type == STRING:
            string(f"value of {key}")
        else:
            fields.append(Field(position, "<I", f"element type of {key}"))
            element_type = u("<I")
            fields.append(Field(position, "<Q", f"array length of {key}"))
            for index in range(u("<Q")):
                if element_type != STRING:
                    position += SCALAR_SIZES[element_type]
                elif index < 3:  # the first few element lengths are enough to mutate
                    string(f"{key}[{index}]")
                else:
                    length = u("<Q")  # read first: `position += u(...)` would add to the position before the read
                    position += length

    (tensor_count,) = struct.unpack_from("<Q", data, 8)
    (kv_count,) = struct.unpack_from("<Q", data, 16)
    for _ in range(kv_count):
        key = string("a key")
        fields.append(Field(position, "<I", f"type of {key}"))
        value(u("<I"), key)
    for _ in range(tensor_count):
        name = string("a tensor name")
        fields.append(Field(position, "<I", f"dims of {name}"))
        for dim in range(u("<I")):
            fields.append(Field(position, "<Q", f"dim {dim} of {name}"))
            position += 8
        fields.append(Field(position, "<I", f"ggml type of {name}"))
        position += 4
        fields.append(Field(position, "<Q", f"offset of {name}"))
        position += 8
    return fields, position


def field_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    fields, _ = header_fields(data)

    @st.composite
    def mutation(draw) -> Mutation:
        field = draw(st.sampled_from(fields))
        (original,) = struct.unpack_from(field.fmt, data, field.offset)
        extremes = EXTREME_U64 if field.fmt == "<Q" else EXTREME_U32
        limit = 2**64 - 1 if field.fmt == "<Q" else 2**32 - 1
        nearby = [v for v in (original - 1, original + 1, original * 2, original + 32) if 0 <= v <= limit]
        value = draw(st.sampled_from(sorted({*extremes, *nearby, *range(0, 14)} - {original})))
        return overwrite_int(data, field.offset, field.fmt, value, f"{field.what} (was {original})")

    return mutation()


def magic_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    return st.sampled_from([b"", b"GGU", b"GGUG", b"FUGG", b"\x00\x00\x00\x00"]).map(
        lambda magic: Mutation(f"magic replaced by {magic!r}", magic + data[4:] if len(magic) == 4 else magic)
    )


def gguf_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    _, header_end = header_fields(data)
    return st.one_of(truncations(data), bit_flips(data, 0, header_end), field_mutations(data), magic_mutations(data))
