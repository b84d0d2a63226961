"""Quantizing with the float weights streamed from their files (the default for local models) writes the same
bytes as loading the whole model first, from sharded safetensors (float16 and float32, tied and untied heads) and
from GGUF; while it runs, at most the layer being quantized is in memory, and the streamed model reads exactly
what load_model gives."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qtool.checkpoints.sources import load_model, resolve_source
from qtool.checkpoints.streamed_model import open_streamed_gguf, open_streamed_safetensors
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.errors import QtoolError
from qtool.quant.float_source import open_float_model
from qtool.quant.pipeline import quantize_model

from fuzz_gguf_writer import write_llama_gguf
from streamed_sources import block_quantized_gguf, files_of, live_model_ids, resident_layers, write_sharded


@pytest.fixture
def sharded_model_dir(make_tiny_llama, make_tiny_tokenizer):
    def write(directory: Path, dtype: torch.dtype, seed: int, **overrides) -> Path:
        """A tiny random Llama saved in shards of at most 20 kB (several tensors per shard, the index naming them)."""
        return write_sharded(directory, make_tiny_llama(seed, **{"num_hidden_layers": 3, **overrides}), make_tiny_tokenizer(), dtype)

    return write


def job(calibration: Path, **fields) -> QuantConfig:
    return replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration), samples=5, seqlen=27, seed=1)), bits=4, group_size=32, **fields)


@pytest.mark.parametrize("dtype,tied,method,compute", [(torch.float16, False, "gptq", "auto"), (torch.float32, True, "gptq", "auto"),
                                                       (torch.float16, True, "rtn", "auto"),
                                                       # weights bfloat16 holds exactly: kept in it for the forwards
                                                       (torch.bfloat16, False, "gptq", "bfloat16")])
def test_streamed_and_whole_model_write_the_same_checkpoint(tmp_path, sharded_model_dir, make_calibration_text, dtype, tied, method, compute):
    source = sharded_model_dir(tmp_path / "model", dtype, seed=7, tie_word_embeddings=tied)
    calibration = make_calibration_text(tmp_path / "calibration.txt")
    config = job(calibration, method=method, compute_dtype=compute)
    whole = quantize_model(str(source), config, tmp_path / "whole", device="cpu", streaming=False, max_shard_size_bytes=25_000)
    streamed = quantize_model(str(source), config, tmp_path / "streamed", device="cpu", streaming=True, max_shard_size_bytes=25_000)
    assert not whole.memory["estimate"]["streaming"] and streamed.memory["estimate"]["streaming"]
    written = files_of(tmp_path / "streamed")
    assert written == files_of(tmp_path / "whole")
    assert sum(name.endswith(".safetensors") for name in written) > 2  # the output is sharded too
    assert streamed.memory["peak_host_bytes"] > 0


def test_only_the_layer_being_quantized_is_in_memory(tmp_path, sharded_model_dir, make_calibration_text):
    from transformers import LlamaForCausalLM

    source = sharded_model_dir(tmp_path / "model", torch.float32, seed=3, num_hidden_layers=4)
    seen: list[tuple[str, set[int]]] = []
    earlier = live_model_ids(LlamaForCausalLM)

    def watch(done: int, total: int, detail: str = "") -> None:
        seen.append((detail, resident_layers(LlamaForCausalLM, earlier)))

    quantize_model(str(source), job(make_calibration_text(tmp_path / "c.txt")), tmp_path / "out", device="cpu", progress=watch)
    during = {detail: layers for detail, layers in seen if detail.startswith("layer ") and " " in detail[6:]}  # "layer 2/4 q_proj+..."
    assert during, seen
    for detail, layers in during.items():
        assert layers == {int(detail.split()[1].split("/")[0]) - 1}, (detail, layers)
    assert seen[-1][1] == set()  # nothing of the layers while the checkpoint is written


def test_streamed_model_reads_what_load_model_gives(tmp_path, sharded_model_dir):
    source = sharded_model_dir(tmp_path / "model", torch.bfloat16, seed=11)
    reference = load_model(str(source), dtype="float32", with_tokenizer=False).model
    streamed = open_streamed_safetensors(source)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    streamed.materialize()
    assert streamed.model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(streamed.model.state_dict()[name], tensor), name
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed.model(ids).logits, reference(ids).logits)
    streamed.release("model.layers.1.")
    assert all(p.device.type == "meta" for p in streamed.model.model.layers[1].parameters())
    assert torch.equal(streamed.float_tensor("model.layers.1.post_attention_layernorm.weight"),
                       reference.state_dict()["model.layers.1.post_attention_layernorm.weight"])


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_gguf_reads_what_the_direct_loader_gives(tmp_path, make_tiny_llama, make_tiny_tokenizer, tied):
    from qtool.checkpoints.gguf_loader import load_gguf_direct

    model = make_tiny_llama(5, tie_word_embeddings=tied)
    if tied:
        del model.lm_head  # llama.cpp writes no output tensor for a tied head
    path = block_quantized_gguf(tmp_path / "tiny.gguf", model, make_tiny_tokenizer())
    reference = load_gguf_direct(path)
    streamed = open_streamed_gguf(path)
    streamed.materialize(exclude="model.layers.")
    assert all(p.device.type == "meta" for p in streamed.model.model.layers.parameters())
    streamed.materialize("model.layers.")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(streamed.model.state_dict()[name], tensor), name
    assert (streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight) == tied
    assert streamed.model.config.to_dict() == reference.config.to_dict()


def test_a_directory_transformers_would_rename_is_loaded_whole(tmp_path, sharded_model_dir):
    from safetensors.torch import load_file, save_file

    source = sharded_model_dir(tmp_path / "model", torch.float32, seed=2)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    old, new = "model.norm.weight", "model.norm.gamma"  # a name the model has no place for: only from_pretrained's renaming can judge it
    shard = source / index["weight_map"].pop(old)
    tensors = load_file(str(shard))
    tensors[new] = tensors.pop(old)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"][new] = shard.name
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "has no place for" in open_streamed_safetensors(source).reason
    with pytest.raises(QtoolError, match="cannot be streamed: its files name tensors LlamaForCausalLM has no place for"):
        open_float_model(resolve_source(str(source)), str(source), streaming=True)


def test_a_damaged_gguf_is_named_by_the_whole_model_loader(tmp_path, make_tiny_llama, make_tiny_tokenizer):
    path = write_llama_gguf(tmp_path / "tiny.gguf", make_tiny_llama(4), make_tiny_tokenizer())
    path.write_bytes(path.read_bytes()[:-4096])  # the last tensor's data cut short
    reason = open_streamed_gguf(path).reason
    assert reason.startswith("its header cannot be read")
    with pytest.raises(QtoolError, match=re.escape(f"cannot be streamed: {reason}")):
        open_float_model(resolve_source(str(path)), str(path), streaming=True)
    with pytest.raises(QtoolError, match=re.escape(f"cannot read GGUF file {path}")):  # auto: load_model's error about the file
        open_float_model(resolve_source(str(path)), str(path))


def test_an_error_of_the_streaming_code_itself_propagates(tmp_path, sharded_model_dir, monkeypatch):
    """Only the faults open_streamed_* recognise in the files fall back to loading whole: a bug in the streaming
    code must not be hidden behind a slower load."""
    import qtool.checkpoints.streamed_model as streamed_model

    def broken(*args):
        raise ZeroDivisionError("a bug in the streaming code")

    source = sharded_model_dir(tmp_path / "model", torch.float32, seed=2)
    monkeypatch.setattr(streamed_model, "_check_shapes", broken)
    with pytest.raises(ZeroDivisionError):
        open_float_model(resolve_source(str(source)), str(source))

def test_a_missing_tensor_is_one_line_before_any_work(tmp_path, sharded_model_dir):
    from safetensors.torch import load_file, save_file

    source = sharded_model_dir(tmp_path / "model", torch.float32, seed=2)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.down_proj.weight"
    shard = source / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QtoolError, match=r"model\.layers\.2\.mlp\.down_proj\.weight: LlamaForCausalLM expects this tensor"):
        open_float_model(resolve_source(str(source)), str(source))


def test_gguf_streamed_and_whole_write_the_same_checkpoint(tmp_path, make_tiny_llama, make_tiny_tokenizer, make_calibration_text):
    path = block_quantized_gguf(tmp_path / "tiny.gguf", make_tiny_llama(9, num_hidden_layers=3), make_tiny_tokenizer())
    config = job(make_calibration_text(tmp_path / "calibration.txt"))
    whole = quantize_model(str(path), config, tmp_path / "whole", device="cpu", streaming=False)
    streamed = quantize_model(str(path), config, tmp_path / "streamed", device="cpu")  # the default for a GGUF file
    assert streamed.memory["estimate"]["streaming"] and not whole.memory["estimate"]["streaming"]
    assert files_of(tmp_path / "streamed") == files_of(tmp_path / "whole")


@pytest.mark.slow
def test_smollm2_gguf_streamed_and_whole_write_the_same_checkpoint(tmp_path, smollm2_path, make_calibration_text):
    calibration = make_calibration_text(tmp_path / "calibration.txt")
    config = replace(QuantConfig(calibration=CalibrationConfig(source=str(calibration), samples=2, seqlen=32, seed=0)), bits=4, group_size=128)
    whole = quantize_model(str(smollm2_path), config, tmp_path / "whole", device="cpu", streaming=False)
    streamed = quantize_model(str(smollm2_path), config, tmp_path / "streamed", device="cpu", streaming=True)
    assert streamed.memory["estimate"]["streaming"] and not whole.memory["estimate"]["streaming"]
    assert files_of(tmp_path / "streamed") == files_of(tmp_path / "whole")


def test_the_next_layer_is_read_ahead_on_another_thread_once(tmp_path, sharded_model_dir):
    """read_ahead(i + 1) reads layer i + 1 on a thread of its own while layer i is worked on; materialize_layer then
    takes those tensors (every tensor read from the files once) with the values the files hold."""
    import threading

    source = sharded_model_dir(tmp_path / "model", torch.float16, seed=5, num_hidden_layers=3)
    float_model = open_float_model(resolve_source(str(source)), str(source))
    whole = load_model(resolve_source(str(source)), device="cpu", dtype="float32").model.state_dict()
    reads: list[tuple[str, str]] = []
    read_file = float_model.streamed.read

    def counted(name: str) -> torch.Tensor:
        reads.append((name, threading.current_thread().name))
        return read_file(name)

    float_model.streamed.read = counted
    prefix = float_model.spec.layers_path
    for index in range(3):
        float_model.materialize_layer(index)
        float_model.read_ahead(index + 1)
        layer = dict(float_model.model.named_parameters())
        for name in (n for n in whole if n.startswith(f"{prefix}.{index}.")):
            assert torch.equal(layer[name], whole[name]), name
        float_model.release_layer(index)
    names = [name for name, _ in reads]
    assert len(names) == len(set(names)) == sum(name.startswith(f"{prefix}.") for name in whole)
    threads = {int(name.split(".")[2]): thread for name, thread in reads}
    assert threads[0] == threading.current_thread().name
    assert threads[1] == "qtool-read-layer-1" and threads[2] == "qtool-read-layer-2"


def test_a_failed_read_ahead_is_raised_where_its_layer_is_materialized(tmp_path, sharded_model_dir):
    source = sharded_model_dir(tmp_path / "model", torch.float32, seed=6, num_hidden_layers=2)
    float_model = open_float_model(resolve_source(str(source)), str(source))

    def failing(name: str) -> torch.Tensor:
        raise OSError(f"cannot read {name} (injected by the test)")

    float_model.materialize_layer(0)
    float_model.streamed.read = failing
    float_model.read_ahead(1)
    with pytest.raises(OSError, match="injected by the test"):
        float_model.materialize_layer(1)
