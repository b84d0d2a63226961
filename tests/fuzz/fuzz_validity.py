"""Per kind of input, whether a mutated file is still valid by its oracle (fuzz_oracles): the safetensors library
reads it; gguf-py reads the same tensor table; a checkpoint config is a JSON object; a quantization config is in
its documented types and ranges. Whether tensors and config agree (a renamed tensor, a changed width) is the
loaders' consistency checks' business, not this structural oracle's."""

from __future__ import annotations

from fuzz_oracles import config_acceptable, gguf_table, parse_config, relied_on_values, safetensors_table
from fuzz_originals import Originals


def still_valid(originals: Originals, kind: str, content: bytes) -> bool:
    original = originals.original_bytes(kind)
    if kind.endswith("-safetensors"):
        return safetensors_table(content) is not None
    if kind == "gguf":
        table = gguf_table(content)
        return table is not None and table == gguf_table(original)
    if kind.startswith("config-"):
        syntax = kind.removeprefix("config-")
        return config_acceptable(content, syntax, parse_config(original, syntax))
    return relied_on_values(content) is not None
