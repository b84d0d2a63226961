"""Quantized outputs cut into size-capped safetensors shards with model.safetensors.index.json: every shard within
the cap (a tensor larger than the cap alone in its own), and both qtool's loader and transformers' shard reader read
back exactly what the single-file output holds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from qtool.checkpoints.sources import load_model
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.byte_sizes import parse_byte_size
from qtool.core.errors import QtoolError
from qtool.quant.pipeline import quantize_model

CAP = 30_000  # bytes: the tiny model's 4-bit output is about 140 kB, its embedding and head 61 kB each


@pytest.fixture
def outputs(tmp_path, tiny_model_dir, calibration_text):
    config = replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration_text), samples=4, seqlen=32)), bits=4, group_size=32)
    quantize_model(str(tiny_model_dir), config, tmp_path / "whole", device="cpu")
    quantize_model(str(tiny_model_dir), config, tmp_path / "sharded", device="cpu", max_shard_size_bytes=CAP)
    return tmp_path / "whole", tmp_path / "sharded"


def test_shards_within_the_cap_and_the_index_lists_them(outputs):
    whole, sharded = outputs
    reference = load_file(str(whole / "model.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert not (sharded / "model.safetensors").exists() and len(shards) > 3
    assert shards == sorted(set(index["weight_map"].values()))
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    stored: dict[str, torch.Tensor] = {}
    for name in shards:
        tensors = load_file(str(sharded / name))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= CAP or len(tensors) == 1, (name, size)
        assert all(index["weight_map"][key] == name for key in tensors)
        stored.update(tensors)
    assert sorted(stored) == sorted(reference)
    assert all(torch.equal(stored[key], reference[key]) for key in reference)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    assert not list(sharded.parent.glob(".sharded*"))  # neither staging folder nor resume state left


def test_qtool_and_transformers_read_the_shards(outputs):
    from transformers.modeling_utils import load_state_dict
    from transformers.utils.hub import get_checkpoint_shard_files

    whole, sharded = outputs
    ids = torch.randint(0, 300, (1, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = load_model(str(whole), dtype="float32").model(ids).logits
        got = load_model(str(sharded), dtype="float32").model(ids).logits
    assert torch.equal(got, expected)
    files, metadata = get_checkpoint_shard_files(str(sharded), str(sharded / "model.safetensors.index.json"))
    reference = load_file(str(whole / "model.safetensors"))
    assert sorted(metadata["all_checkpoint_keys"]) == sorted(reference)
    read = {key: tensor for file in files for key, tensor in load_state_dict(file).items()}
    assert sorted(read) == sorted(reference) and all(torch.equal(read[key], reference[key]) for key in reference)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5kB", 1500), ("123", 123), ("64 KiB", 65536)])
def test_sizes_as_transformers_writes_them(text, size):
    assert parse_byte_size(text, "--max-shard-size") == size


@pytest.mark.parametrize("text", ["5XB", "", "-1GB", "0", "GB"])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(QtoolError, match="--max-shard-size"):
        parse_byte_size(text, "--max-shard-size")
