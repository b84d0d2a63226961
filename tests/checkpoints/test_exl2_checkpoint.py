"""Whole EXL2 checkpoints: a tiny Llama with EXL2 linears written and loaded back (also through load_model),
its logits compared with the same model holding the weights the writer was given; the config ExLlamaV2 reads,
tied embeddings, a padded head, files as ExLlamaV2 writes them, and refusals."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.core.errors import QtoolError
from qtool.checkpoints.exl2_checkpoint import (
    exl2_weights_of,
    is_exl2_checkpoint,
    load_exl2_model,
    read_measurement,
    save_exl2_model,
)
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.checkpoints.sources import load_model


def reference_model(model, weights):
    """The float model as stored (float16-rounded) with each EXL2 linear's given weight in place."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(param.half().float())
        for name, w in weights.items():
            # a new Parameter: a quantized head no longer shares the (tied) embedding's tensor
            ref.get_submodule(name).weight = torch.nn.Parameter(w.dequantize(torch.float32))
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 200, 17, 33, 2, 64, 128, 7, 250, 3]])


@pytest.mark.parametrize("include_head, vocab", [(False, 320), (True, 320), (True, 301)])
def test_save_load_logits_match_given_weights(tmp_path, make_tiny_llama, make_random_exl2_weights, include_head, vocab):
    model = make_tiny_llama(seed=1, vocab_size=vocab)
    weights = make_random_exl2_weights(model, seed=2, include_head=include_head)
    out = save_exl2_model(tmp_path / "exl2", model, weights, {"calibration": {"rows": 8, "length": 64, "dataset": "t.txt"}})
    loaded = load_exl2_model(out, dtype=torch.float32)
    assert sum(isinstance(m, Exl2Linear) for m in loaded.modules()) == len(weights)
    assert torch.equal(logits(loaded, IDS), logits(reference_model(model, weights), IDS))
    # the unpacked weights are the ones given
    for name, w in exl2_weights_of(loaded).items():
        assert torch.equal(w.dequantize(), weights[name].dequantize()), name
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "exl2" and config["version"] and config["calibration"]["rows"] == 8
    body = [w for n, w in weights.items() if n != "lm_head"]
    expected_bits = sum(w.storage_bits() for w in body) / sum(w.in_features * w.out_features for w in body)
    assert config["bits"] == round(expected_bits, 2)
    assert (config["head_bits"] > 0) == include_head


def test_load_model_and_float16(tmp_path, make_tiny_llama, make_random_exl2_weights):
    model = make_tiny_llama(seed=3)
    weights = make_random_exl2_weights(model, seed=4)
    save_exl2_model(tmp_path / "m", model, weights, measurement={"layers": {"x": [1, 2]}})
    assert is_exl2_checkpoint(tmp_path / "m")
    assert read_measurement(tmp_path / "m") == {"layers": {"x": [1, 2]}}
    loaded = load_model(tmp_path / "m", device="cpu", dtype="float32", with_tokenizer=False)
    assert loaded.quantization_config["quant_method"] == "exl2"
    assert torch.equal(logits(loaded.model, IDS), logits(reference_model(model, weights), IDS))
    half = load_exl2_model(tmp_path / "m", dtype=torch.float16)
    layer = half.model.layers[0].mlp.down_proj
    assert torch.equal(layer.dequantized_weight(torch.float16), weights["model.layers.0.mlp.down_proj"].dequantize(torch.float16))


def test_tied_embeddings_stay_tied(tmp_path, make_tiny_llama, make_random_exl2_weights):
    model = make_tiny_llama(seed=5, tie_word_embeddings=True)
    weights = make_random_exl2_weights(model, seed=6)
    save_exl2_model(tmp_path / "t", model, weights)
    stored = load_file(str(tmp_path / "t" / "model.safetensors"))
    assert "lm_head.weight" not in stored
    loaded = load_exl2_model(tmp_path / "t", dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded, IDS), logits(reference_model(model, weights), IDS))


def test_quantized_head_unties(tmp_path, make_tiny_llama, make_random_exl2_weights):
    model = make_tiny_llama(seed=7, tie_word_embeddings=True)
    weights = make_random_exl2_weights(model, seed=8, include_head=True)
    save_exl2_model(tmp_path / "h", model, weights)
    assert json.loads((tmp_path / "h" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_exl2_model(tmp_path / "h", dtype=torch.float32)
    assert isinstance(loaded.lm_head, Exl2Linear)
    assert torch.equal(logits(loaded, IDS), logits(reference_model(model, weights), IDS))


def test_reads_files_as_exllamav2_writes_them(tmp_path, make_tiny_llama, make_random_exl2_weights):
    """No q_perm, weights in output.safetensors."""
    model = make_tiny_llama(seed=9)
    weights = make_random_exl2_weights(model, seed=10)
    save_exl2_model(tmp_path / "q", model, weights)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".q_perm")}
    (tmp_path / "q" / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "q" / "output.safetensors"))
    loaded = load_exl2_model(tmp_path / "q", dtype=torch.float32)
    assert torch.equal(logits(loaded, IDS), logits(reference_model(model, weights), IDS))


def test_refusals(tmp_path, make_tiny_llama, make_random_exl2_weights):
    model = make_tiny_llama(seed=11)
    weights = make_random_exl2_weights(model, seed=12)
    out = save_exl2_model(tmp_path / "r", model, weights)
    with pytest.raises(QtoolError, match="already exists"):
        save_exl2_model(out, model, weights)
    save_exl2_model(out, model, weights, force=True)
    with pytest.raises(QtoolError, match="names no linear"):
        save_exl2_model(tmp_path / "x", model, {"model.layers.0.nope": next(iter(weights.values()))})
    with pytest.raises(QtoolError, match="no EXL2 linears"):
        save_exl2_model(tmp_path / "y", model, {})
    # a tensor missing from the file names the tensor
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.q_scale"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QtoolError, match="k_proj.q_scale"):
        load_exl2_model(out)
    # a config that says exl2 over float weights
    float_dir = tmp_path / "f"
    model.save_pretrained(float_dir)
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "bits": 4.0}
    (float_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(QtoolError, match="no tensor ends in .q_weight"):
        load_exl2_model(float_dir)
