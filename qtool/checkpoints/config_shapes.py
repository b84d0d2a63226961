"""config.json against the stored tensors: the shapes the model class builds from the config's sizes
(hidden_size, intermediate_size, vocab_size, heads x head_dim, ...) must be the shapes the files hold."""

from __future__ import annotations

from typing import Any, Mapping

from qtool.core.errors import QtoolError

# The config fields a tensor's dimensions come from, and the products of two of them (attention widths).
SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads", "num_key_value_heads",
               "moe_intermediate_size", "num_local_experts", "num_experts")
PRODUCT_FIELDS = (("num_attention_heads", "head_dim"), ("num_key_value_heads", "head_dim"))
WRONG_CONFIG = "config.json belongs to another model or was edited: use the config.json the weights were saved with"


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fields_giving(config: Any, size: int) -> list[str]:
    """'field is value' for each config size field equal to `size`, else for each heads x head_dim product."""
    text = _text_config(config)
    found = [f"{name} is {size}" for name in SIZE_FIELDS if getattr(text, name, None) == size]
    if found:  # a field of that very size explains it; a product equal by chance would only confuse
        return found
    for heads, width in PRODUCT_FIELDS:
        a, b = getattr(text, heads, None), getattr(text, width, None)
        if isinstance(a, int) and isinstance(b, int) and a * b == size:
            found.append(f"{heads} x {width} is {a} x {b} = {size}")
    return found


def config_shape_error(config: Any, expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]],
                       files: Mapping[str, str]) -> QtoolError | None:
    """The error for the first tensor (in the model's order) whose stored shape is not the one the model class
    builds from `config`, naming the config field that size comes from; None when all agree. Only tensors both
    sides name are compared (quantized linears have no float weight to compare: their readers check them)."""
    mismatched = [name for name, shape in expected.items() if name in stored and tuple(stored[name]) != tuple(shape)]
    if not mismatched:
        return None
    name = mismatched[0]
    want, have = list(expected[name]), list(stored[name])
    sizes = [w for w, h in zip(want, have) if w != h] if len(want) == len(have) else want
    fields = [field for size in dict.fromkeys(sizes) for field in fields_giving(config, size)]
    cause = " and ".join(fields) if fields else f"its sizes imply {want}"
    others = f"; {len(mismatched) - 1} more tensors disagree" if len(mismatched) > 1 else ""
    return QtoolError(
        f"config.json: {cause} but {name} in {files.get(name, 'the weight files')} has shape {have} (the config implies {want}{others})",
        WRONG_CONFIG,
    )
