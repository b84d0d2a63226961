"""The checks every loader makes before computing (checkpoints/): scales, tensors missing, quantized tensors
without a quantization config, config.json against the stored shapes. Each error is the one `qtool validate`
gives as a finding for the same directory (validate_path), word for word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from qtool.checkpoints.config_shapes import config_shape_error
from qtool.checkpoints.exl2_checkpoint import load_exl2_model, save_exl2_model
from qtool.checkpoints.expected_tensors import expected_tensor_shapes, meta_model, missing_tensor_names
from qtool.checkpoints.gptq_checkpoint import load_quantized_model, save_quantized_model
from qtool.checkpoints.sources import load_model
from qtool.core.errors import QtoolError
from qtool.core.findings import Level
from qtool.quant.rtn import rtn_quantize
from qtool.validate.dispatch import validate_path

Q0 = "model.layers.0.self_attn.q_proj"


def edit_tensors(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def validate_error(directory: Path) -> str:
    """The one error finding of validate_path, as its line."""
    [finding] = [f for f in validate_path(directory).findings if f.level is Level.ERROR]
    return finding.one_line()


def refusal(load, *args, **kwargs) -> str:
    with pytest.raises(QtoolError) as caught:
        load(*args, **kwargs)
    return caught.value.one_line()


@pytest.fixture
def gptq_dir(tmp_path, tiny_llama):
    quantized = {name: rtn_quantize(m.weight.detach(), 4, 32).quantized for name, m in tiny_llama.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    return save_quantized_model(tmp_path / "gptq", tiny_llama, quantized)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.25, 0.0], ids=["nan", "inf", "negative", "zero"])
def test_gptq_loader_refuses_bad_scales_in_validates_words(gptq_dir, value):
    edit_tensors(gptq_dir / "model.safetensors", lambda t: t[f"{Q0}.scales"].__setitem__((2, 7), value))
    line = refusal(load_quantized_model, gptq_dir, dtype=torch.float32)
    assert line.startswith(f"{Q0}.scales: 1 of 288 scales in model.safetensors are ")
    assert line == validate_error(gptq_dir)
    assert refusal(load_model, gptq_dir) == line


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), -0.05, 0.0], ids=["nan", "-inf", "negative", "zero"])
def test_exl2_loader_refuses_bad_q_scale_max_in_validates_words(tmp_path, tiny_llama, make_random_exl2_weights, value):
    directory = save_exl2_model(tmp_path / "exl2", tiny_llama, make_random_exl2_weights(tiny_llama, seed=3))
    edit_tensors(directory / "model.safetensors", lambda t: t[f"{Q0}.q_scale_max"].__setitem__(0, value))
    line = refusal(load_exl2_model, directory, dtype=torch.float32)
    assert line.startswith(f"{Q0}.q_scale_max: 1 of ")
    assert line == validate_error(directory)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_float_loader_refuses_a_missing_tensor_in_validates_words(tmp_path, tiny_llama, sharded):
    name = "model.layers.1.self_attn.v_proj.weight"
    tiny_llama.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "5GB")
    file = next(f for f in tmp_path.glob("*.safetensors") if name in load_file(str(f)))
    edit_tensors(file, lambda t: t.pop(name))
    if sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refusal(load_model, tmp_path, with_tokenizer=False)
    assert line.startswith(f"{name}: LlamaForCausalLM expects this tensor but the weight files lack it (1 missing in all)")
    assert line == validate_error(tmp_path)


def test_gptq_loader_refuses_a_missing_float_tensor(gptq_dir):
    edit_tensors(gptq_dir / "model.safetensors", lambda t: [t.pop("model.norm.weight"), t.pop("lm_head.weight")])
    line = refusal(load_quantized_model, gptq_dir, dtype=torch.float32)
    assert line.startswith("lm_head.weight: LlamaForCausalLM expects this tensor but the weight files lack it (2 missing in all)")


def test_tied_head_and_buffers_are_not_missing(tmp_path, make_tiny_llama):
    model = make_tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    stored = set(load_file(str(tmp_path / "model.safetensors")))
    assert "lm_head.weight" not in stored
    built = meta_model(model.config)
    expected = expected_tensor_shapes(built)
    assert "lm_head.weight" not in expected and not any("rotary_emb" in name for name in expected)
    assert missing_tensor_names(built, stored) == []
    loaded = load_model(tmp_path, with_tokenizer=False).model
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert [f for f in validate_path(tmp_path).findings if f.level is not Level.INFO] == []


def test_files_in_a_naming_transformers_renames_are_left_to_the_load(tiny_llama):
    built = meta_model(tiny_llama.config)
    renamed = {name.replace("model.", "transformer.", 1) for name in tiny_llama.state_dict()}
    assert missing_tensor_names(built, renamed) is None


@pytest.mark.parametrize("fmt", ["gptq", "exl2"])
def test_quantized_tensors_without_quantization_config_in_validates_words(tmp_path, tiny_llama, make_random_exl2_weights, fmt):
    if fmt == "gptq":
        quantized = {Q0: rtn_quantize(tiny_llama.get_submodule(Q0).weight.detach(), 4, 32).quantized}
        directory = save_quantized_model(tmp_path / fmt, tiny_llama, quantized)
        (directory / "quantize_config.json").unlink()
    else:
        directory = save_exl2_model(tmp_path / fmt, tiny_llama, make_random_exl2_weights(tiny_llama, seed=1))
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    line = refusal(load_model, directory, with_tokenizer=False)
    suffix = "qweight" if fmt == "gptq" else "q_weight"
    assert line.startswith("config.json: has no quantization_config but ") and fmt.upper() in line, suffix
    assert line == validate_error(directory)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(hidden_size=192, head_dim=32), "hidden_size is 192 but model.embed_tokens.weight in model.safetensors has shape [320, 96] (the config implies [320, 192]"),
        (dict(vocab_size=256), "vocab_size is 256 but model.embed_tokens.weight in model.safetensors has shape [320, 96] (the config implies [256, 96]"),
        (dict(head_dim=32), "num_attention_heads x head_dim is 6 x 32 = 192 but model.layers.0.self_attn.q_proj.weight in model.safetensors has shape [96, 96]"),
        (dict(num_key_value_heads=3), "num_key_value_heads x head_dim is 3 x 16 = 48 but model.layers.0.self_attn.k_proj.weight in model.safetensors has shape [32, 96]"),
    ],
    ids=["hidden", "vocab", "head_dim", "kv_heads"],
)
def test_config_contradicting_the_tensors_in_validates_words(tmp_path, tiny_llama, overrides, words):
    tiny_llama.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = refusal(load_model, tmp_path, with_tokenizer=False)
    assert line.startswith(f"config.json: {words}")
    assert line == validate_error(tmp_path)


def test_gptq_loader_checks_the_config_before_installing_linears(gptq_dir):
    config = json.loads((gptq_dir / "config.json").read_text())
    config["vocab_size"] = 256
    (gptq_dir / "config.json").write_text(json.dumps(config))
    line = refusal(load_quantized_model, gptq_dir, dtype=torch.float32)
    assert line.startswith("config.json: vocab_size is 256 but model.embed_tokens.weight in model.safetensors has shape [320, 96]")
    assert line == validate_error(gptq_dir)


def test_config_shape_error_without_a_named_field():
    config = LlamaConfig(hidden_size=96, num_attention_heads=6, head_dim=16, vocab_size=320)
    problem = config_shape_error(config, {"x.weight": (7, 5)}, {"x.weight": (7,)}, {})
    assert problem.message == "config.json: its sizes imply [7, 5] but x.weight in the weight files has shape [7] (the config implies [7, 5])"
