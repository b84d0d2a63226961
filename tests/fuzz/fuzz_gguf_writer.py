"""A tiny Llama written as a GGUF file with gguf-py's GGUFWriter in llama.cpp's conventions: the valid file the
GGUF mutations start from (float32 tensors, q/k rows interleaved per head as llama.cpp's converter stores them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MODEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in MODEL_NAMES:
        return MODEL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def add_tokenizer(writer, tokenizer) -> None:
    """The tiny byte-level BPE as a "gpt2" GGUF tokenizer (tokens by id, merges, specials), what transformers'
    GGUF tokenizer reader rebuilds a fast tokenizer from."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
    special = {t.content for t in tokenizer.added_tokens_decoder.values()}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)


def write_llama_gguf(path: Path, model, tokenizer) -> Path:
    from gguf import GGUFWriter

    config = model.config
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_custom_alignment(32)  # written out, so that mutations reach it (0 and odd values)
    writer.add_string("general.name", "tiny ünïcode llama")
    # an array of strings and one of ints, so array lengths and element types are there to mutate
    writer.add_array("general.tags", ["a", "bb", "ccc"])
    writer.add_array("general.languages", [1, 2, 3])
    add_tokenizer(writer, tokenizer)
    for hf_name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            values = interleave_rotary_rows(values, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            values = interleave_rotary_rows(values, config.num_key_value_heads)
        writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
