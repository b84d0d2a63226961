"""Size on disk and bits per weight from file headers: GPTQ checkpoints (every bit width, partial groups),
float safetensors, GGUF files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qtool.checkpoints.footprint import model_footprint
from qtool.checkpoints.sources import ModelSource


def gptq_tensors(prefix: str, in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Random tensors with the GPTQ layout: qweight [in*bits/32, out], qzeros [groups, out*bits/32] (int32),
    scales [groups, out] float16, g_idx [in] int32."""
    groups = math.ceil(in_features / group_size) if group_size > 0 else 1
    return {
        prefix + "qweight": torch.randint(0, 2**31 - 1, (in_features * bits // 32, out_features), dtype=torch.int32),
        prefix + "qzeros": torch.randint(0, 2**31 - 1, (groups, out_features * bits // 32), dtype=torch.int32),
        prefix + "scales": torch.rand(groups, out_features).half(),
        prefix + "g_idx": (torch.arange(in_features) // (group_size if group_size > 0 else in_features)).int(),
        prefix + "bias": torch.zeros(out_features).half(),
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_gptq_bits_count_codes_zeros_scales_and_g_idx(tmp_path, bits, group_size):
    shapes = [(96, 160), (160, 96)]  # 96 is not a multiple of 64 or 128: the last group is partial
    tensors = {"model.embed_tokens.weight": torch.zeros(50, 96).half()}
    for index, (in_features, out_features) in enumerate(shapes):
        tensors.update(gptq_tensors(f"model.layers.{index}.mlp.proj.", in_features, out_features, bits, group_size))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))

    footprint = model_footprint(ModelSource("hf_dir", tmp_path), config)

    stored = weights = 0
    for in_features, out_features in shapes:
        groups = math.ceil(in_features / group_size) if group_size > 0 else 1
        stored += in_features * out_features * bits + groups * out_features * (bits + 16) + in_features * 32
        weights += in_features * out_features
    assert footprint.bits_per_weight == pytest.approx(stored / weights)
    assert footprint.size_bytes == (tmp_path / "model.safetensors").stat().st_size
    assert footprint.format == f"gptq {bits}-bit " + (f"g{group_size}" if group_size > 0 else "per-channel")


@pytest.mark.parametrize("dtype, bits, label", [(torch.float32, 32, "float32"), (torch.float16, 16, "float16"), (torch.bfloat16, 16, "bfloat16")])
def test_float_checkpoint_bits_follow_the_stored_dtype(tmp_path, dtype, bits, label):
    save_file({"a.weight": torch.zeros(7, 5, dtype=dtype), "b.weight": torch.zeros(3, dtype=dtype)}, str(tmp_path / "model-00001.safetensors"))
    save_file({"c.weight": torch.zeros(11, 2, dtype=dtype)}, str(tmp_path / "model-00002.safetensors"))
    footprint = model_footprint(ModelSource("hf_dir", tmp_path), None)
    assert footprint.bits_per_weight == bits
    assert footprint.format == label
    assert footprint.size_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))


def test_gguf_bits_are_stored_bits_over_elements(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    quantized = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", quantize(quantized, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    footprint = model_footprint(ModelSource("gguf", tmp_path, gguf_file=path.name), None)
    # Q8_0 stores each block of 32 weights as 32 int8 codes and one float16 scale: 8.5 bits per weight.
    expected = (8 * 64 * 8.5 + 64 * 32 + 4 * 64 * 16) / (8 * 64 + 64 + 4 * 64)
    assert footprint.bits_per_weight == pytest.approx(expected)
    assert footprint.size_bytes == path.stat().st_size
    assert footprint.format == "gguf Q8_0"
