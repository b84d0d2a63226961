"""Structural mutations of a valid safetensors file: truncation, bit flips in the header, the 8-byte header length
zero/huge/past the end, and the JSON header rewritten with wrong dtypes, shapes and offsets, odd keys and
non-object headers. Tensor values are left alone (value checks are the loaders' own tests)."""

from __future__ import annotations

import json
import struct

from hypothesis import strategies as st

from fuzz_bytes import EXTREME_U64, bit_flips, truncations
from fuzz_mutation import Mutation

NON_FINITE = (float("nan"), float("inf"), float("-inf"))
ODD_VALUES = st.sampled_from([None, True, "", "F32", [], {}, -1, 1.5, 2**64, -(2**63), *NON_FINITE, [[1]], "1"])
ODD_KEYS = st.sampled_from(["", " ", "ä\u0301", "\u202e", "\x00", "😀" * 3, "k" * 5000, "model.embed_tokens.weight\x00"])


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode("utf-8", errors="surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


def rewritten(data: bytes, description: str, change) -> Mutation:
    header, body = split(data)
    changed = change(header)
    return Mutation(description, join(changed if isinstance(changed, str) else json.dumps(changed, allow_nan=True), body))


def entry_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    """One field of one tensor entry replaced, deleted, or set from another entry."""
    header, _ = split(data)
    names = sorted(k for k in header if k != "__metadata__")
    fields = st.sampled_from(["dtype", "shape", "data_offsets"])
    dtypes = st.sampled_from(["F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "F8_E4M3", "F4", "Q4_0", "f32", "", "F32 "])
    dims = st.lists(st.one_of(st.integers(-2, 2**65), ODD_VALUES), max_size=5)
    offsets = st.one_of(
        st.lists(st.integers(-(2**64), 2**65), min_size=0, max_size=3),
        st.tuples(st.integers(0, len(data)), st.integers(0, len(data))).map(list),
        st.lists(ODD_VALUES, min_size=2, max_size=2),
    )

    @st.composite
    def mutation(draw) -> Mutation:
        name, field = draw(st.sampled_from(names)), draw(fields)
        how = draw(st.sampled_from(["set", "delete", "copy"]))
        if how == "delete":
            value, text = None, f"{name}.{field} deleted"
        elif how == "copy":  # another tensor's offsets or shape: overlapping data, a size that does not match
            other = draw(st.sampled_from(names))
            value, text = header[other][field], f"{name}.{field} set to {other}'s"
        else:
            value = draw({"dtype": st.one_of(dtypes, ODD_VALUES), "shape": dims, "data_offsets": offsets}[field])
            text = f"{name}.{field} set to {value!r}"[:300]

        def change(h: dict) -> dict:
            if how == "delete":
                del h[name][field]
            else:
                h[name][field] = value
            return h

        return rewritten(data, text, change)

    return mutation()


def key_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    """A tensor renamed to an odd key, a key written twice, __metadata__ of the wrong shape, the header not an
    object, or the entry itself not an object."""
    header, _ = split(data)
    names = sorted(k for k in header if k != "__metadata__")

    def renamed(name: str, key: str) -> Mutation:
        return rewritten(data, f"{name} renamed to {key[:40]!r}", lambda h: {(key if k == name else k): v for k, v in h.items()})

    def duplicated(name: str) -> Mutation:
        # json.dumps cannot write a key twice: splice the entry's text in again
        def change(h: dict) -> str:
            text = json.dumps(h)
            entry = json.dumps({name: h[name]})[1:-1]
            return text[:-1] + ", " + entry + "}"

        return rewritten(data, f"{name} written twice", change)

    def entry_not_object(name: str, value) -> Mutation:
        return rewritten(data, f"{name}'s entry set to {value!r}", lambda h: {**h, name: value})

    def metadata(value) -> Mutation:
        return rewritten(data, f"__metadata__ set to {value!r}", lambda h: {**h, "__metadata__": value})

    def header_is(value) -> Mutation:
        return rewritten(data, f"header replaced by {value!r}", lambda h: json.dumps(value, allow_nan=True))

    some_name = st.sampled_from(names)
    return st.one_of(
        st.builds(renamed, some_name, ODD_KEYS),
        st.builds(duplicated, some_name),
        st.builds(entry_not_object, some_name, ODD_VALUES),
        st.builds(metadata, st.one_of(ODD_VALUES, st.dictionaries(ODD_KEYS, ODD_VALUES, max_size=2))),
        st.builds(header_is, st.sampled_from([[], 0, "x", None, [{}], {"a": {"b": {"c": {}}}}])),
        st.just(_bad_utf8(data)),
    )


def _bad_utf8(data: bytes) -> Mutation:
    header_text = json.dumps(split(data)[0])
    raw = header_text.encode()[:-2] + b"\xff\xfe" + header_text.encode()[-2:]
    return Mutation("invalid UTF-8 in the header", struct.pack("<Q", len(raw)) + raw + split(data)[1])


def length_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    (length,) = struct.unpack("<Q", data[:8])
    values = st.sampled_from(sorted({*EXTREME_U64, length - 1, length + 1, len(data) - 8, len(data) - 7, len(data)}))
    return values.map(lambda v: Mutation(f"header length set to {v}", struct.pack("<Q", v) + data[8:]))


def safetensors_mutations(data: bytes) -> st.SearchStrategy[Mutation]:
    (length,) = struct.unpack("<Q", data[:8])
    return st.one_of(
        truncations(data),
        bit_flips(data, 0, 8 + length),
        length_mutations(data),
        entry_mutations(data),
        key_mutations(data),
    )
