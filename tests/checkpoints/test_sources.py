"""Model sources and loading: directories, GGUF, Hub ids (offline), aliases, pickle refusal."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.checkpoints.sources import load_model, plain_model_copy, resolve_device, resolve_source


def test_hf_directory_loads_with_same_logits(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, with_tokenizer=False)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_llama(ids).logits)
    assert loaded.source.kind == "hf_dir"
    assert loaded.quantization_config is None


def test_missing_path_names_it():
    with pytest.raises(QtoolError, match="no/such/model' not found"):
        resolve_source("./no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(QtoolError, match="has no config.json"):
        resolve_source(tmp_path)


def test_non_gguf_file_refused(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(QtoolError, match="not a .gguf model"):
        resolve_source(path)


def test_pickle_only_refused_without_flag(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(QtoolError, match="only pickled weights.*safe_serialization=True"):
        load_model(tmp_path, with_tokenizer=False)
    loaded = load_model(tmp_path, with_tokenizer=False, allow_pickle=True)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_llama(ids).logits)


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    source = resolve_source("some-org/some-model")
    assert source.kind == "hub"
    with pytest.raises(QtoolError, match="HF_HUB_OFFLINE is set.*") as info:
        load_model(source)
    assert "local model directory" in info.value.hint


def test_unsupported_quant_method(tmp_path, tiny_llama):
    tiny_llama.config.quantization_config = {"quant_method": "awq", "bits": 4}
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(QtoolError, match="'awq' is not supported"):
        load_model(tmp_path, with_tokenizer=False)


def test_device_rules():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(QtoolError, match="--device gpu is not valid"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(QtoolError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.slow
def test_smollm2_alias_loads_plain_float_model(smollm2_path):
    loaded = load_model("smollm2-135m")
    model = loaded.model
    assert loaded.source.gguf_file == smollm2_path.name
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template


def test_plain_copy_drops_quantization_marker(tiny_llama):
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    plain = plain_model_copy(tiny_llama)
    assert "quantization_config" not in plain.config.to_dict()
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, tiny_llama(ids).logits)


def test_unknown_dtype_is_one_line_error(tmp_path):
    from qtool.core.errors import QtoolError
    from qtool.checkpoints.sources import load_model

    with pytest.raises(QtoolError, match="float8.*bfloat16"):
        load_model(str(tmp_path), dtype="float8")
