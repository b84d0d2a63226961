"""Reading GGUF files straight into a float model: a tiny Llama written here in llama.cpp's conventions (q/k rows
interleaved per head, some tensors block-quantized) must load with the weights transformers' own GGUF loader
gives, and the original float weights where the file stores floats; files outside the table fall back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.checkpoints.gguf_loader import load_gguf_direct, read_gguf_state, uninterleave_rotary_rows
from qtool.checkpoints.sources import ModelSource, load_gguf_float_model, load_gguf_tokenizer, load_model
from qtool.core.errors import QtoolError

HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script: each head's rows reordered from (half, pair) to (pair, half)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_names(config) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for layer in range(config.num_hidden_layers):
        for hf, gguf_name in HF_TO_GGUF_LAYER.items():
            names[f"model.layers.{layer}.{hf}"] = f"blk.{layer}.{gguf_name}"
    return names


def write_llama_gguf(path: Path, model, block_quantized: dict[str, str], arch: str = "llama", extra_keys: dict | None = None, bos_token_id: int = 1) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_uint32("tokenizer.ggml.bos_token_id", bos_token_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for key, value in (extra_keys or {}).items():
        writer.add_float32(key, value)
    names = gguf_names(config)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for a tied head
        values = tensor.float().numpy()
        if arch != "llama":  # only llama.cpp's Llama converter reorders q/k rows
            pass
        elif hf_name.endswith("q_proj.weight"):
            values = llama_cpp_row_order(values, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            values = llama_cpp_row_order(values, config.num_key_value_heads)
        gguf_name = names[hf_name]
        if gguf_name in block_quantized:
            kind = GGMLQuantizationType[block_quantized[gguf_name]]
            writer.add_tensor(gguf_name, quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BLOCK_QUANTIZED = {"blk.0.attn_k.weight": "Q4_1", "blk.1.attn_q.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_1", "token_embd.weight": "Q8_0"}


@pytest.mark.parametrize("heads,rows,cols", [(6, 96, 7), (2, 32, 5), (1, 4, 3)])
def test_uninterleave_inverts_llama_cpp_row_order(heads, rows, cols):
    weight = np.random.default_rng(heads).standard_normal((rows, cols)).astype(np.float32)
    stored = torch.from_numpy(llama_cpp_row_order(weight, heads))
    assert torch.equal(uninterleave_rotary_rows(stored, heads), torch.from_numpy(weight))


def test_direct_load_matches_transformers_gguf_loader(tmp_path, make_tiny_llama):
    from transformers import AutoModelForCausalLM

    original = make_tiny_llama(seed=3)
    path = write_llama_gguf(tmp_path / "tiny.gguf", original, BLOCK_QUANTIZED)
    direct = load_gguf_direct(path)
    assert direct is not None
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours, theirs = direct.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # float tensors come back exactly as the model had them, the rotary row order undone
    block_quantized = {hf for hf, gguf_name in gguf_names(original.config).items() if gguf_name in BLOCK_QUANTIZED}
    for name, tensor in original.state_dict().items():
        if name not in block_quantized:
            assert torch.equal(ours[name], tensor), name
        else:  # a block-quantized tensor differs from the float one, by at most Q4_1's step
            assert not torch.equal(ours[name], tensor) and torch.allclose(ours[name], tensor, atol=0.2 * tensor.abs().max().item())
    assert direct.config.rope_parameters["rope_theta"] == 50000.0
    assert (direct.config.num_key_value_heads, direct.config.head_dim, direct.config.bos_token_id) == (2, 16, 1)
    ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, reference(ids).logits)


def test_float_q_and_k_round_trip_through_the_row_order(tmp_path, make_tiny_llama):
    original = make_tiny_llama(seed=4)
    path = write_llama_gguf(tmp_path / "float.gguf", original, {})
    direct = load_gguf_direct(path)
    for name, tensor in original.state_dict().items():
        assert torch.equal(direct.state_dict()[name], tensor), name


def test_tied_head_when_the_file_has_no_output_tensor(tmp_path, make_tiny_llama):
    original = make_tiny_llama(seed=5, tie_word_embeddings=True)
    path = write_llama_gguf(tmp_path / "tied.gguf", original, {})
    direct = load_gguf_direct(path)
    assert direct.config.tie_word_embeddings
    assert direct.lm_head.weight.data_ptr() == direct.model.embed_tokens.weight.data_ptr()


def test_unmapped_files_fall_back_to_transformers(tmp_path, make_tiny_llama):
    original = make_tiny_llama(seed=6)
    scaled = write_llama_gguf(tmp_path / "scaled.gguf", original, {}, extra_keys={"llama.rope.scaling.factor": 2.0})
    assert read_gguf_state(scaled) is None
    other = write_llama_gguf(tmp_path / "other.gguf", original, {}, arch="falcon")
    assert read_gguf_state(other) is None


def test_loader_falls_back_and_gives_the_same_model(tmp_path, make_tiny_llama, monkeypatch):
    """With the direct path declining, load_gguf_float_model takes transformers' loader: same weights."""
    from qtool.checkpoints import gguf_loader

    monkeypatch.setenv("QTOOL_CACHE_DIR", "off")
    path = write_llama_gguf(tmp_path / "tiny.gguf", make_tiny_llama(seed=7), BLOCK_QUANTIZED)
    source = ModelSource("gguf", tmp_path, gguf_file=path.name)
    direct = load_gguf_float_model(source).state_dict()
    monkeypatch.setattr(gguf_loader, "FAMILIES", {})
    fallback = load_gguf_float_model(source).state_dict()
    assert direct.keys() == fallback.keys() and all(torch.equal(direct[k], fallback[k]) for k in direct)


def test_a_tensor_count_cut_by_one_is_refused_not_loaded_as_a_tied_model(tmp_path, make_tiny_llama):
    """The fuzz case: the count of an untied model's file cut from 21 to 20 drops output.weight (written last), which
    reads as a tied head, and starts the data section earlier, so every tensor came from shifted bytes (exit 0)."""
    import struct

    path = write_llama_gguf(tmp_path / "cut.gguf", make_tiny_llama(seed=9), {})
    data = bytearray(path.read_bytes())
    (count,) = struct.unpack_from("<Q", data, 8)
    struct.pack_into("<Q", data, 8, count - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(QtoolError, match=r"cut\.gguf.*bytes follow the last of the"):
        load_model(str(path), with_tokenizer=False)


def test_special_token_ids_outside_the_vocabulary_are_refused(tmp_path, make_tiny_llama):
    model = make_tiny_llama(seed=10)
    vocab = model.config.vocab_size
    assert load_gguf_direct(write_llama_gguf(tmp_path / "last.gguf", model, {}, bos_token_id=vocab - 1)).config.bos_token_id == vocab - 1
    path = write_llama_gguf(tmp_path / "past.gguf", model, {}, bos_token_id=vocab)
    with pytest.raises(QtoolError, match=rf"past\.gguf.*bos_token_id is {vocab}, outside the vocabulary of {vocab} tokens"):
        load_model(str(path), with_tokenizer=False)


def test_a_tokenizer_token_id_past_its_token_list_is_refused_naming_the_file(tmp_path):
    """Files of families qtool's loader does not map reach transformers' GGUF tokenizer unchecked: it indexes the
    token list with the special ids and raised a bare IndexError."""
    from gguf import GGUFWriter

    def write(name: str, eos_token_id: int) -> ModelSource:
        writer = GGUFWriter(str(tmp_path / name), arch="falcon")
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "ab", "<s>"])
        writer.add_token_types([1, 1, 1, 3])
        writer.add_token_merges(["a b"])
        writer.add_bos_token_id(3)
        writer.add_eos_token_id(eos_token_id)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return ModelSource("gguf", tmp_path, gguf_file=name)

    assert load_gguf_tokenizer(write("inside.gguf", 3)).eos_token == "<s>"
    with pytest.raises(QtoolError, match=r"past\.gguf: a token id is outside its token list"):
        load_gguf_tokenizer(write("past.gguf", 4))


def test_qwen2_keeps_its_row_order_and_biases(tmp_path):
    """Qwen2 files store q/k rows as transformers does, and q/k/v carry biases."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(8)
    original = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                                            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    for name, parameter in original.named_parameters():
        if name.endswith("bias"):  # initialised to zero: give them values that would show a mix-up
            parameter.data.normal_()
    path = write_llama_gguf(tmp_path / "qwen.gguf", original, {"blk.1.ffn_down.weight": "Q8_0"}, arch="qwen2")
    direct = load_gguf_direct(path)
    assert direct is not None and direct.config.model_type == "qwen2"
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours, theirs = direct.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
        assert torch.equal(ours[f"model.layers.0.{name}"], original.state_dict()[f"model.layers.0.{name}"]), name


@pytest.mark.slow
def test_smollm2_direct_load_and_tokenizer_match_transformers(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct = load_gguf_direct(smollm2_path)
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    ours, theirs = direct.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(direct.config, field) == getattr(reference.config, field), field
    assert direct.config.rope_parameters["rope_theta"] == reference.config.rope_parameters["rope_theta"]

    fast = load_gguf_tokenizer(ModelSource("gguf", smollm2_path.parent, gguf_file=smollm2_path.name))
    auto = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    text = "Hello world! What is the capital of France? <|im_start|>user\n  spaced\tout"
    assert fast(text)["input_ids"] == auto(text)["input_ids"]
    assert (fast.bos_token, fast.eos_token, fast.pad_token, fast.chat_template) == (auto.bos_token, auto.eos_token, auto.pad_token, auto.chat_template)
