"""validate/float_model.py: a float model transformers writes (sharded too) is clean, the linears it takes from
the headers are the decoder's, and --config gives the model-aware and memory findings."""

from __future__ import annotations

import dataclasses
import json

import torch

from qtool.core.findings import Level
from qtool.formats.safetensors_header import read_checkpoint_headers
from qtool.validate.dispatch import validate_path
from qtool.validate.float_model import linear_shapes_from_headers
from qtool.validate.report import ValidationReport


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
