"""What the streaming tests of both quantization pipelines share: a float model saved in size-capped safetensors
shards, a GGUF with some tensors block-quantized, a checkpoint's files as bytes, and which decoder layers of live
models hold their weights (not on the meta device)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import torch

from fuzz_gguf_writer import write_llama_gguf

# GGUF tensors stored block-quantized, as llama.cpp files hold most of theirs: the streamed read dequantizes them
BLOCK_QUANTIZED = {"blk.0.attn_k.weight": "Q4_1", "blk.1.attn_q.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_1", "token_embd.weight": "Q8_0"}


def write_sharded(directory: Path, model, tokenizer, dtype: torch.dtype, max_shard_size: str = "20KB") -> Path:
    """`model` in `dtype` saved in shards of at most `max_shard_size` (several tensors per shard, the index naming
    them), with the tokenizer's files."""
    model.to(dtype).save_pretrained(str(directory), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(directory))
    assert len(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    return directory


def block_quantized_gguf(path: Path, model, tokenizer) -> Path:
    """fuzz_gguf_writer's tiny GGUF (tokenizer included) with some tensors block-quantized."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    plain = write_llama_gguf(path.with_suffix(".float.gguf"), model, tokenizer)
    reader = GGUFReader(str(plain))
    writer = GGUFWriter(str(path), arch="llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        values = np.array(tensor.data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if tensor.name in BLOCK_QUANTIZED:
            kind = GGMLQuantizationType[BLOCK_QUANTIZED[tensor.name]]
            writer.add_tensor(tensor.name, quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    plain.unlink()
    return path


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def live_model_ids(model_type: type) -> frozenset[int]:
    """The ids of the live models of `model_type` (those other tests left alive, to leave out later)."""
    gc.collect()
    return frozenset(id(obj) for obj in gc.get_objects() if type(obj) is model_type)


def resident_layers(model_type: type, ignore: frozenset[int] = frozenset()) -> set[int]:
    """Indices of the decoder layers of live models of `model_type` whose weights are in memory (not on meta),
    leaving out the objects whose ids are in `ignore` (models other tests left alive)."""
    found: set[int] = set()
    for obj in gc.get_objects():
        if type(obj) is model_type and id(obj) not in ignore:
            for index, layer in enumerate(obj.model.layers):
                if any(p.device.type != "meta" for p in layer.parameters()):
                    found.add(index)
    return found
