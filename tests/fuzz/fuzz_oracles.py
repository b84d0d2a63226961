"""Independent answers to "is this mutated file still a valid input?", from other readers than qtool's: the
safetensors library, gguf-py's GGUFReader, the standard JSON/YAML/TOML parsers with the documented ranges. A
command may exit 0 on a mutated file only where its oracle says yes."""

from __future__ import annotations

import json
import math
import tomllib

import yaml

from fuzz_checkpoint_configs import MODEL_KEYS, QUANT_KEYS


def safetensors_table(content: bytes) -> dict | None:
    """{name: (dtype, shape)} as the safetensors library reads the file (every tensor's data too), or None."""
    from safetensors import safe_open
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(content)
        handle.flush()
        try:
            with safe_open(handle.name, framework="pt") as reader:
                table = {}
                for name in reader.keys():
                    tensor = reader.get_tensor(name)
                    table[name] = (str(tensor.dtype), tuple(tensor.shape))
                return table
        except Exception:  # noqa: BLE001 - any refusal of the library means "not valid"
            return None


def gguf_table(content: bytes) -> list | None:
    """[(name, type, shape, offset)] as gguf-py's GGUFReader reads the file, or None."""
    from gguf import GGUFReader
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as handle:
        handle.write(content)
        handle.flush()
        try:
            reader = GGUFReader(handle.name)
            return [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset)) for t in reader.tensors]
        except Exception:  # noqa: BLE001
            return None


def relied_on_values(content: bytes) -> dict | None:
    """The model and quantization keys of a checkpoint JSON config, or None when it is not a JSON object."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    quant = data.get("quantization_config", data)
    if not isinstance(quant, dict):
        return None
    # repr keeps 1 and True apart (== would not)
    return {"model": {k: repr(data.get(k)) for k in MODEL_KEYS}, "quant": {k: repr(quant.get(k)) for k in QUANT_KEYS}}


# The documented ranges of the config keys the original config sets (README, `qtool validate` rules).
RANGES = {
    "schema_version": lambda v: v == 1,
    "method": lambda v: v in ("gptq", "rtn"),
    "bits": lambda v: v in (2, 3, 4, 8),
    "group_size": lambda v: v == -1 or v >= 16,
    "sym": lambda v: True,
    "damp_percent": lambda v: 0 < v < 1,
    "output_format": lambda v: v == "gptq",
    "source": lambda v: False,  # any other path than the original's
    "samples": lambda v: v >= 1,
    "seqlen": lambda v: v >= 8,
    "seed": lambda v: v >= 0,
}


def parse_config(content: bytes, syntax: str):
    text = content.decode("utf-8")
    return json.loads(text) if syntax == "json" else tomllib.loads(text) if syntax == "toml" else yaml.safe_load(text)


def config_acceptable(content: bytes, syntax: str, original: dict) -> bool:
    """Whether the standard parser reads a mapping whose keys are the original's (some may be missing: they take
    their defaults), each value of the original's type, finite, and in its documented range or unchanged."""
    try:
        data = parse_config(content, syntax)
    except Exception:  # noqa: BLE001
        return False
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("calibration", {}), dict):
        return False
    pairs = [(k, v, original.get(k)) for k, v in data.items() if k != "calibration"]
    pairs += [(k, v, original["calibration"].get(k)) for k, v in data.get("calibration", {}).items()]
    for key, value, before in pairs:
        if type(before) is int and type(value) is float and value.is_integer():
            value = int(value)  # the schema's documented rule: a whole number written as 4.0 is the integer 4
        if before is None or type(value) is not type(before):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if value != before and not RANGES[key](value):
            return False
    return True
