"""A GGUF file read straight into a float transformers model: the header is read once (qtool.checkpoints.gguf_file),
the config comes from its metadata through a table, and each tensor is dequantized (gguf-py) and renamed.

transformers can load GGUF files too, but for a small model it spends tens of seconds on the way (it parses the
metadata two to three times and initialises weights it then overwrites), which a first `qtool quantize` of the
demo model paid in full. This path covers the families whose GGUF layout the table below describes and answers
None for anything else, so the caller falls back to transformers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtool.checkpoints.expected_tensors import missing_tensors_error
from qtool.checkpoints.gguf_file import ArrayValue, GgufFormatError, GgufHeader, GgufTensor, read_gguf_header
from qtool.core.errors import QtoolError
from qtool.checkpoints.weight_init import skipped_weight_init

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufFamily:
    """How one GGUF architecture maps onto a transformers model type."""

    model_type: str
    # llama.cpp's converter interleaves the two rotary halves of each head's q and k rows for this family
    rotary_rows_interleaved: bool
    # transformers config field -> GGUF metadata key under "<arch>." (required ones)
    config_keys: tuple[tuple[str, str], ...]
    optional_config_keys: tuple[tuple[str, str], ...] = ()


LLAMA_CONFIG_KEYS = (
    ("num_hidden_layers", "block_count"),
    ("hidden_size", "embedding_length"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
)
LLAMA_OPTIONAL_KEYS = (
    ("num_key_value_heads", "attention.head_count_kv"),
    ("max_position_embeddings", "context_length"),
    ("rope_theta", "rope.freq_base"),
    ("head_dim", "attention.key_length"),
)

FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("llama", True, LLAMA_CONFIG_KEYS, LLAMA_OPTIONAL_KEYS),
    "qwen2": GgufFamily("qwen2", False, LLAMA_CONFIG_KEYS, LLAMA_OPTIONAL_KEYS),
}

# metadata that changes what the model computes in ways the table does not carry: such files go to transformers
UNSUPPORTED_KEY_SUFFIXES = ("rope.scaling.type", "rope.scaling.factor", "expert_count", "attention.sliding_window")

# GGUF tensor name (after "blk.N.") -> transformers name (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
MODEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# transformers' token id fields -> GGUF tokenizer keys
TOKEN_ID_KEYS = (
    ("bos_token_id", "tokenizer.ggml.bos_token_id"),
    ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ("unk_token_id", "tokenizer.ggml.unknown_token_id"),
)


def scalar_field(metadata: dict[str, Any], key: str) -> Any:
    """A scalar or string metadata value, or None when the file lacks it (or holds an array there)."""
    value = metadata.get(key)
    return None if isinstance(value, ArrayValue) else value


def uninterleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for q/k: it stores each head's rows as (pair, half) where transformers keeps
    (half, pair), so that its rotary kernel can rotate adjacent values."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def transformers_name(gguf_name: str) -> str | None:
    if gguf_name in MODEL_TENSORS:
        return MODEL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None


def config_fields(metadata: dict[str, Any], family: GgufFamily, architecture: str, tensor_names: set[str]) -> dict[str, Any] | None:
    fields: dict[str, Any] = {}
    for name, key in family.config_keys:
        value = scalar_field(metadata, f"{architecture}.{key}")
        if value is None:
            log.info("GGUF metadata lacks %s.%s: loading through transformers", architecture, key)
            return None
        fields[name] = value
    for name, key in family.optional_config_keys:
        value = scalar_field(metadata, f"{architecture}.{key}")
        if value is not None:
            fields[name] = value
    for name, key in TOKEN_ID_KEYS:
        value = scalar_field(metadata, key)
        if value is not None:
            fields[name] = value
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = scalar_field(metadata, f"{architecture}.vocab_size")
    fields["vocab_size"] = vocab_size if vocab_size is not None else (tokens.length if isinstance(tokens, ArrayValue) else None)
    if fields["vocab_size"] is None:
        return None
    rotary_dims = scalar_field(metadata, f"{architecture}.rope.dimension_count")
    head_dim = fields.get("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if rotary_dims is not None and rotary_dims != head_dim:
        log.info("GGUF rotates %d of %d head dims: loading through transformers", rotary_dims, head_dim)
        return None
    fields["tie_word_embeddings"] = "output.weight" not in tensor_names
    if "rope_theta" in fields:
        # transformers 5 keeps it inside rope_parameters; older readers look for the top-level key
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(fields["rope_theta"])}
    return fields


@dataclass(frozen=True)
class GgufLayout:
    """What a GGUF file this module can map holds: its family, the transformers config fields, and each tensor
    under its transformers name (read one at a time by dequantized_tensor)."""

    header: GgufHeader
    family: GgufFamily
    fields: dict[str, Any]
    tensors: dict[str, GgufTensor]  # transformers name -> the file's tensor


def read_gguf_layout(path: Path) -> GgufLayout | None:
    """The layout of a GGUF file whose family, metadata and tensor names the table maps, else None (the caller
    loads it through transformers). Reads the header only."""
    header = read_gguf_header(path)
    architecture = scalar_field(header.metadata, "general.architecture")
    family = FAMILIES.get(architecture)
    if family is None:
        log.info("GGUF architecture %r is not in qtool's table: loading through transformers", architecture)
        return None
    if any(key.endswith(UNSUPPORTED_KEY_SUFFIXES) for key in header.metadata):
        log.info("GGUF file sets metadata qtool's table does not map: loading through transformers")
        return None
    fields = config_fields(header.metadata, family, architecture, {tensor.name for tensor in header.tensors})
    if fields is None:
        return None
    check_fields_against_tensors(fields, header, architecture)
    tensors: dict[str, GgufTensor] = {}
    for tensor in header.tensors:
        name = transformers_name(tensor.name)
        if name is None:
            log.info("GGUF tensor %s is not in qtool's table: loading through transformers", tensor.name)
            return None
        tensors[name] = tensor
    return GgufLayout(header, family, fields, tensors)


def dequantized_tensor(layout: GgufLayout, name: str) -> torch.Tensor:
    """The float32 tensor `name` (a transformers name) of the file, as transformers' model holds it (q/k rows
    back in transformers' rotary order). gguf-py raises NotImplementedError for a type it cannot dequantize."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    tensor = layout.tensors[name]
    # read into memory of its own rather than through the header's file map, whose pages, once read, would stay
    # in the process's resident memory as long as the map (a streamed model reads the whole file that way)
    stored = np.fromfile(layout.header.path, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)
    values = dequantize(stored.reshape(*tensor.shape[:-1], -1), GGMLQuantizationType(tensor.ggml_type))
    weight = torch.from_numpy(values.astype(np.float32, copy=False)).reshape(tensor.shape)
    fields = layout.fields
    rotary_heads = {"self_attn.q_proj.weight": fields["num_attention_heads"],
                    "self_attn.k_proj.weight": fields.get("num_key_value_heads", fields["num_attention_heads"])}
    suffix = name.split(".", 3)[-1]
    if layout.family.rotary_rows_interleaved and suffix in rotary_heads:
        weight = uninterleave_rotary_rows(weight, rotary_heads[suffix])
    return weight


def read_gguf_state(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]] | None:
    """(model type, config fields, float32 state dict) of a GGUF file this module can map, else None."""
    layout = read_gguf_layout(path)
    if layout is None:
        return None
    state = float_state_dict(layout)
    return None if state is None else (layout.family.model_type, layout.fields, state)


def check_fields_against_tensors(fields: dict[str, Any], header: GgufHeader, architecture: str) -> None:
    """The widths and counts the metadata gives must be positive integers that the tensor table bears out: a
    corrupted block_count of 2**32 would otherwise have transformers build four billion layers."""
    for name, value in fields.items():
        if name in ("rms_norm_eps", "rope_theta", "rope_parameters", "tie_word_embeddings"):
            continue
        lowest = 0 if name.endswith("_token_id") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise GgufFormatError(f"metadata {name} is {value!r}, not an integer >= {lowest}")
    # a special token's id indexes the embedding rows and the tokenizer's token list (transformers' GGUF tokenizer
    # reads tokens[id] and fails with a bare IndexError past the end)
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocabulary = min(fields["vocab_size"], tokens.length) if isinstance(tokens, ArrayValue) else fields["vocab_size"]
    for name, value in fields.items():
        if name.endswith("_token_id") and value >= vocabulary:
            raise GgufFormatError(f"metadata {name} is {value}, outside the vocabulary of {vocabulary} tokens")
    blocks = {tensor.name.split(".")[1] for tensor in header.tensors if tensor.name.startswith("blk.")}
    if fields["num_hidden_layers"] != len(blocks):
        raise GgufFormatError(f"{architecture}.block_count is {fields['num_hidden_layers']} but the file holds tensors of {len(blocks)} blocks")
    embedding = next((tensor for tensor in header.tensors if tensor.name == "token_embd.weight"), None)
    if embedding is not None and embedding.shape != (fields["vocab_size"], fields["hidden_size"]):
        raise GgufFormatError(
            f"token_embd.weight is {list(embedding.shape)} but the metadata gives vocab_size {fields['vocab_size']} and embedding_length {fields['hidden_size']}"
        )


def float_state_dict(layout: GgufLayout) -> dict[str, torch.Tensor] | None:
    state: dict[str, torch.Tensor] = {}
    for name, tensor in layout.tensors.items():
        try:
            state[name] = dequantized_tensor(layout, name)
        except NotImplementedError:
            log.info("gguf-py cannot dequantize %s (type %d): loading through transformers", tensor.name, tensor.ggml_type)
            return None
    return state


def load_gguf_direct(path: Path) -> Any | None:
    """A float32 transformers model of the GGUF file, or None when the file needs transformers' own loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    read = read_gguf_state(path)
    if read is None:
        return None
    model_type, fields, state = read
    config = AutoConfig.for_model(model_type, **fields)
    with skipped_weight_init():  # every weight is assigned from the file below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing and not unexpected:
        # the file lacks tensors it should hold (names all known): transformers' loader would fill them at random
        problem = missing_tensors_error(type(model).__name__, missing)
        raise QtoolError(f"{path}: {problem.message}", problem.hint)
    if missing or unexpected:
        log.info("GGUF tensors do not match a %s model (missing %s, unexpected %s): loading through transformers", model_type, missing[:3], unexpected[:3])
        return None
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
