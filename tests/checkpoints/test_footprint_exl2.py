"""Bits per weight of EXL2 checkpoints from their safetensors headers, held against Exl2Weight.storage_bits of
the weights qtool's loader reads back (ExLlamaV2's count: codes, 4-bit scales, q_scale_max, q_groups,
q_invperm), for mixed widths, a quantized or float head, padded outputs and biases."""

from __future__ import annotations

import pytest
import torch

from qtool.checkpoints.exl2_checkpoint import exl2_weights_of, load_exl2_model, save_exl2_model
from qtool.checkpoints.footprint import model_footprint
from qtool.checkpoints.sources import ModelSource, read_quantization_config


def loaded_bits(directory) -> tuple[float, float | None]:
    """(bits per weight of the linears but the head, the head's mean code width or None) from the weights the
    loader unpacks, counted by Exl2Weight."""
    weights = exl2_weights_of(load_exl2_model(directory, dtype=torch.float32))
    body = {n: w for n, w in weights.items() if n != "lm_head"}
    bpw = sum(w.storage_bits() for w in body.values()) / sum(w.in_features * w.out_features for w in body.values())
    head = weights.get("lm_head")
    return bpw, (head.code_bits() / (head.in_features * head.out_features) if head is not None else None)


def footprint_of(directory):
    return model_footprint(ModelSource("hf_dir", directory), read_quantization_config(directory))


@pytest.mark.parametrize(
    ("include_head", "vocab"),
    [(False, 320), (True, 320), (True, 301)],  # 301: the head's outputs are padded to 320 in q_weight and q_scale
)
def test_bits_per_weight_match_the_loaded_weights(tmp_path, make_tiny_llama, make_random_exl2_weights, include_head, vocab):
    model = make_tiny_llama(seed=1, vocab_size=vocab)
    out = save_exl2_model(tmp_path / "exl2", model, make_random_exl2_weights(model, seed=2, include_head=include_head))
    expected_bpw, head_bits = loaded_bits(out)

    footprint = footprint_of(out)

    assert footprint.bits_per_weight == pytest.approx(expected_bpw, rel=1e-12)
    assert footprint.size_bytes == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    head = "float head" if head_bits is None else f"{round(head_bits, 2):g}-bit head"
    assert footprint.format == f"exl2 {expected_bpw:.2f} bpw, {head}"
    assert (head_bits is not None) == include_head


def test_bias_gives_the_width_of_padded_outputs(tmp_path, make_tiny_llama, make_random_exl2_weights):
    # One key/value head of 16: k_proj and v_proj have 16 outputs, stored padded to 32 columns.
    model = make_tiny_llama(seed=3, num_key_value_heads=1, attention_bias=True)
    assert model.model.layers[0].self_attn.k_proj.out_features == 16
    out = save_exl2_model(tmp_path / "bias", model, make_random_exl2_weights(model, seed=4, include_head=False))
    expected_bpw, _ = loaded_bits(out)
    assert footprint_of(out).bits_per_weight == pytest.approx(expected_bpw, rel=1e-12)


def test_only_the_head_quantized_counts_the_head(tmp_path, make_tiny_llama, make_random_exl2_weights):
    model = make_tiny_llama(seed=5)
    head = make_random_exl2_weights(model, seed=6, include_head=True)["lm_head"]
    out = save_exl2_model(tmp_path / "head", model, {"lm_head": head})
    footprint = footprint_of(out)
    assert footprint.bits_per_weight == pytest.approx(head.storage_bits() / (head.in_features * head.out_features), rel=1e-12)
    assert footprint.format.endswith(f"{round(head.code_bits() / (head.in_features * head.out_features), 2):g}-bit head")
