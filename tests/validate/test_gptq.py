"""validate/gptq.py: GPTQ checkpoints that GPTQModel and save_quantized_model write are clean, and GPTQ tensors
are grouped by layer with a bias only where a layer is quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qtool.checkpoints.gptq_checkpoint import save_quantized_model
from qtool.core.findings import Level
from qtool.formats.quantized_weight import QuantizedWeight
from qtool.formats.safetensors_header import read_checkpoint_headers
from qtool.validate.dispatch import validate_path
from qtool.validate.gptq import group_gptq_tensors


def test_group_gptq_tensors_attaches_bias_only_to_quantized_layers(tmp_path):
    tensors = {
        "l.0.a.qweight": torch.zeros(4, 32, dtype=torch.int32),
        "l.0.a.bias": torch.zeros(32),
        "l.0.b.weight": torch.zeros(32, 32),
        "l.0.b.bias": torch.zeros(32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    headers, _, _ = read_checkpoint_headers(tmp_path)
    layers = group_gptq_tensors(headers)
    assert set(layers) == {"l.0.a"} and set(layers["l.0.a"]) == {"qweight", "bias"}


GPTQMODEL_FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel").glob("llama_*"))


@pytest.mark.parametrize("fixture", GPTQMODEL_FIXTURES, ids=lambda p: p.name)
def test_checkpoints_written_by_gptqmodel_are_clean(fixture):
    report = validate_path(fixture)
    assert report.kind == "checkpoint"
    assert [f.one_line() for f in report.findings if f.level is not Level.INFO] == []
    assert report.summary["quantized_layers"] == 14  # 2 layers x 7 linears


def _random_quantized(model: torch.nn.Module, bits: int, group_size: int, sym: bool, act_order: bool, seed: int) -> dict[str, QuantizedWeight]:
    gen = torch.Generator().manual_seed(seed)
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            out_features, in_features = module.weight.shape
            groups = 1 if group_size == -1 else -(-in_features // group_size)
            g_idx = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
            if act_order:
                g_idx = g_idx[torch.randperm(in_features, generator=gen)]
            zeros = torch.full((groups, out_features), 2 ** (bits - 1)) if sym else torch.randint(1, 2**bits, (groups, out_features), generator=gen)
            quantized[name] = QuantizedWeight(
                codes=torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.int32),
                scales=torch.rand(groups, out_features, generator=gen) * 0.01 + 1e-4,
                zeros=zeros.to(torch.int32),
                g_idx=g_idx.to(torch.int32),
                bits=bits,
                group_size=group_size,
            )
    return quantized


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "act_order", "fmt"),
    [(2, 32, False, False, "gptq"), (3, 64, True, True, "gptq"), (4, 64, False, True, "gptq_v2"), (8, -1, True, False, "gptq")],
)
def test_checkpoints_written_by_save_quantized_model_are_clean(tmp_path, tiny_llama, bits, group_size, sym, act_order, fmt):
    quantized = _random_quantized(tiny_llama, bits, group_size, sym, act_order, seed=bits)
    out = save_quantized_model(tmp_path / "q", tiny_llama, quantized, {"desc_act": act_order}, checkpoint_format=fmt, max_shard_size_bytes=60_000)
    report = validate_path(out)
    assert [f.one_line() for f in report.findings if f.level is not Level.INFO] == []
    assert report.summary["quantized_layers"] == len(quantized)
    assert report.summary["files"] > 1
