"""convert/inspect_checkpoint.py and the checks under it, as a library: reports on files transformers itself
writes, header parsing against the safetensors library, the GPTQ bit-stream unpacking, quantization_config
checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtool.core.errors import QtoolError
from qtool.core.findings import Level
from qtool.core.config import QuantConfig
from qtool.checkpoints.gptq_checkpoint import save_quantized_model
from qtool.validate.gptq_checks import group_gptq_tensors
from qtool.validate.inspect_checkpoint import ValidationReport, check_quantization_config, linear_shapes_from_headers, validate_path
from qtool.formats.safetensors_header import read_checkpoint_headers, read_file_header
from qtool.formats.quantized_weight import QuantizedWeight


def test_headers_agree_with_the_safetensors_library(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=gen).half(),
        "b": torch.randint(0, 9, (7,), dtype=torch.int32, generator=gen),
        "c": torch.randn(2, 2, 2, generator=gen, dtype=torch.float64),
        "d": torch.zeros(0, 4),
        "e": torch.ones(4, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header, findings = read_file_header(path)
    assert findings == [] and header.readable
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(header.tensors)
        for name in handle.keys():
            piece = handle.get_slice(name)
            assert list(header.tensors[name].shape) == piece.get_shape()
            assert header.tensors[name].dtype == piece.get_dtype()
            assert header.tensors[name].numel == tensors[name].numel()


def test_transformers_sharded_float_model_is_clean(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    report = validate_path(tmp_path)
    assert isinstance(report, ValidationReport) and report.kind == "float_model"
    assert [f for f in report.findings if f.level is not Level.INFO] == []
    assert report.summary["params"] == sum(p.numel() for p in tiny_llama.parameters())
    assert report.summary["files"] > 1
    json.dumps(report.to_dict())


def test_linear_shapes_from_headers_are_the_decoder_linears(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    tensors, _, findings = read_checkpoint_headers(tmp_path)
    assert findings == []
    expected = {
        name: (module.in_features, module.out_features)
        for name, module in tiny_llama.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    assert linear_shapes_from_headers(tensors) == expected  # no config: every 2-D weight inside a layer
    assert linear_shapes_from_headers(tensors, tiny_llama.config) == expected  # the architecture table's groups


def test_linear_shapes_leave_out_what_the_architecture_table_excludes(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    tensors, _, _ = read_checkpoint_headers(tmp_path)
    extra = dict(tensors)
    extra["model.layers.0.mlp.router.weight"] = dataclasses.replace(tensors["model.layers.0.mlp.up_proj.weight"], name="model.layers.0.mlp.router.weight")
    assert "model.layers.0.mlp.router" in linear_shapes_from_headers(extra)
    assert "model.layers.0.mlp.router" not in linear_shapes_from_headers(extra, tiny_llama.config)


def test_model_aware_report_on_a_transformers_model(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "model")
    config = tmp_path / "c.yaml"
    config.write_text("group_size: 64\ncalibration:\n  samples: 4\n  seqlen: 32\n")
    report = validate_path(tmp_path / "model", config_file=config, device="cpu")
    assert report.ok
    infos = [f.message for f in report.findings if f.level is Level.INFO]
    assert "96 = 1×64 + 32: last group has 32 columns" in infos and "160 = 2×64 + 32: last group has 32 columns" in infos
    assert report.summary["linears"] == 7 * tiny_llama.config.num_hidden_layers
    assert report.summary["memory_estimate"]["device"] == "cpu"


def test_not_a_model_raises_exit_2(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(QtoolError) as raised:
        validate_path(tmp_path)
    assert raised.value.exit_code == 2
    assert raised.value.hint == "x.gguf is a GGUF file: qtool validate checks safetensors checkpoints"


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


def test_check_quantization_config_builds_the_quant_config():
    config, findings = check_quantization_config(
        {"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": False, "desc_act": True, "format": "gptq_v2",
         "model_name_or_path": "ignored", "pack_dtype": "int32"},
        "q",
    )
    assert findings == []
    assert config == QuantConfig(bits=3, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2")


def test_check_quantization_config_collects_every_problem():
    config, findings = check_quantization_config({"bits": "x", "group_size": 3, "desc_act": None}, "q")
    assert config is None
    assert [f"{f.where}: {f.message}" for f in findings] == [
        "q.quant_method: is missing",
        "q.bits: must be an integer, got 'x'",
        "q.desc_act: must be true or false, got None",
        "q.group_size: 3 is not valid",
    ]


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
