"""Mutations of a checkpoint's JSON configs (config.json with its quantization_config, quantize_config.json):
the keys loaders rely on given wrong types, NaN/inf, huge or negative values, unicode strings, or removed; odd
keys added; the document not an object; raw truncations and bit flips of the text."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

from fuzz_bytes import bit_flips, truncations
from fuzz_mutation import Mutation

# The keys whose values decide how a checkpoint is built and read; a change to any of them must be refused or
# be harmless (the oracle compares them, see fuzz_oracles.relied_on_values).
MODEL_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings")
QUANT_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "pack_dtype", "format", "dynamic", "is_marlin_format")
VALUES = (None, True, False, 0, -1, 1, 3, 5, 7, 2**31, 2**63, 10**30, -(10**30), 0.5, math.nan, math.inf, -math.inf, "", "ünï", "4", [], [4], {}, {"a": 1})
ODD_KEYS = ("", "ünïcode", "😀", "\u0000", "k" * 300)


def key_paths(original: dict) -> list[tuple[str, ...]]:
    paths = [(k,) for k in MODEL_KEYS if k in original]
    section = original.get("quantization_config")
    if isinstance(section, dict):
        paths += [("quantization_config", k) for k in QUANT_KEYS]
        paths.append(("quantization_config",))
    else:
        paths += [(k,) for k in QUANT_KEYS]  # quantize_config.json holds the fields at top level
    return paths


def json_mutations(original: dict) -> st.SearchStrategy[Mutation]:
    paths = key_paths(original)

    @st.composite
    def mutation(draw) -> Mutation:
        data = json.loads(json.dumps(original))
        how = draw(st.sampled_from(["set", "delete", "odd key", "document"]))
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if how == "set":
            value = draw(st.sampled_from(VALUES))
            parent[path[-1]] = value
            text = f"{'.'.join(path)} set to {value!r}"
        elif how == "delete":
            parent.pop(path[-1], None)
            text = f"{'.'.join(path)} deleted"
        elif how == "odd key":
            key = draw(st.sampled_from(ODD_KEYS))
            parent[key] = draw(st.sampled_from(VALUES))
            text = f"key {key[:20]!r} added next to {'.'.join(path)}"
        else:
            data = draw(st.sampled_from([[], "x", 1, None, [original]]))
            text = f"document replaced by {str(data)[:30]}"
        return Mutation(text, json.dumps(data, allow_nan=True).encode())

    return mutation()


def checkpoint_config_mutations(content: bytes) -> st.SearchStrategy[Mutation]:
    return st.one_of(truncations(content), bit_flips(content, 0, len(content)), json_mutations(json.loads(content)))
