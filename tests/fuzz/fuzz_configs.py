"""Mutations of a valid quantization config (YAML, JSON or TOML): a key given a wrong type, NaN/inf, a huge
value or a unicode string, unknown and unicode keys, a calibration block that is not a mapping, a document that
is not a mapping; then written in the file's own syntax. Raw truncations and bit flips of the text too."""

from __future__ import annotations

import json
import math

import yaml
from hypothesis import strategies as st

from fuzz_bytes import bit_flips, truncations
from fuzz_mutation import Mutation
from fuzz_originals import toml_text

NON_FINITE = (math.nan, math.inf, -math.inf)
HUGE = (10**30, -(10**30), 2**63, 2**64, 1e308, -1e308)
WRONG_TYPES = ("4", "", "ünï", [], [4], {}, {"a": 1}, True, False, 4.5, None)
ODD_KEYS = ("bitz", "", " ", "ünïcode", "😀", "BITS", "calibration/samples", "k" * 300)


def serialize(data, syntax: str) -> bytes | None:
    """The data in the file's syntax; None where the syntax cannot hold it (TOML has no null, and no top-level
    non-table)."""
    if syntax == "json":
        return json.dumps(data, allow_nan=True).encode()
    if syntax == "yaml":
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode()
    if not isinstance(data, dict) or "null" in json.dumps(data):
        return None
    text = toml_text(data).replace("NaN", "nan").replace("-Infinity", "-inf").replace("Infinity", "inf")
    return text.encode()


def data_mutations(original: dict, syntax: str) -> st.SearchStrategy[Mutation]:
    keys = [k for k in original if k != "calibration"] + [f"calibration.{k}" for k in original["calibration"]]

    def with_value(path: str, value) -> dict:
        data = json.loads(json.dumps(original))
        section, _, key = path.rpartition(".")
        (data[section] if section else data)[key] = value
        return data

    @st.composite
    def mutation(draw) -> Mutation | None:
        how = draw(st.sampled_from(["wrong type", "non-finite", "huge", "unknown key", "calibration", "document"]))
        path = draw(st.sampled_from(keys))
        must_fail = True
        if how == "wrong type":
            value = draw(st.sampled_from(WRONG_TYPES).filter(lambda v: type(v) is not type(_get(original, path))))
            # an int where a float is expected is a number all the same (0.01 vs 1 is then a range question)
            must_fail = not (isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(_get(original, path), float))
            data, text = with_value(path, value), f"{path} set to {value!r}"
        elif how == "non-finite":
            value = draw(st.sampled_from(NON_FINITE))
            data, text = with_value(path, value), f"{path} set to {value!r}"
        elif how == "huge":
            value = draw(st.sampled_from(HUGE))
            # a huge seed or sample count is a legal value; the run must still end cleanly either way
            must_fail = path not in ("calibration.seed", "calibration.samples", "calibration.seqlen", "group_size")
            data, text = with_value(path, value), f"{path} set to {value!r}"
        elif how == "unknown key":
            key = draw(st.sampled_from(ODD_KEYS))
            section = draw(st.sampled_from(["", "calibration"]))
            data = with_value(f"{section}.{key}" if section else key, 1)
            text = f"unknown key {key[:20]!r}" + (f" in {section}" if section else "")
        elif how == "calibration":
            value = draw(st.sampled_from([[], "wikitext", 1, None, [{"samples": 1}]]))
            data, text = with_value("calibration", value), f"calibration set to {value!r}"
        else:
            data = draw(st.sampled_from([[], [original], "gptq", 4, None]))
            text = f"document replaced by {str(data)[:40]}"
            must_fail = data is not None  # an empty document is the defaults: a valid config
        content = serialize(data, syntax)
        return None if content is None else Mutation(text, content, must_fail=must_fail)

    return mutation().filter(lambda m: m is not None)


def _get(data: dict, path: str):
    section, _, key = path.rpartition(".")
    return (data[section] if section else data)[key]


def config_mutations(content: bytes, original: dict, syntax: str) -> st.SearchStrategy[Mutation]:
    return st.one_of(truncations(content), bit_flips(content, 0, len(content)), data_mutations(original, syntax))
