"""`qtool run`'s engine sizes (runtime/engine_sizing.py): the batch cap and cache blocks reach the EngineConfig, a
GPU memory fraction becomes the blocks that fit in what is left of it once the model is loaded (device memory
given by the test: no GPU here), and every bad combination is one QtoolError."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig
from qtool.runtime.engine.model_runner import ModelRunner
from qtool.runtime.engine_sizing import EngineSizing, kv_cache_budget

GIB = 1 << 30


def test_counts_reach_the_engine(tiny_llama):
    config = EngineSizing(max_batch=3, cache_blocks=11).engine_config(tiny_llama, EngineConfig(kv_cache_bytes=1 << 20))
    assert (config.max_num_seqs, config.num_blocks, config.kv_cache_bytes) == (3, 11, None)
    engine = Engine(tiny_llama, None, config)
    assert engine.num_blocks == 11 and engine.scheduler.max_num_seqs == 3
    assert EngineSizing().engine_config(tiny_llama, EngineConfig(max_num_seqs=1)) == EngineConfig(max_num_seqs=1)


@pytest.mark.parametrize("fraction", [0.3, 0.9, 1.0])
def test_a_memory_fraction_becomes_the_blocks_left_of_it(tiny_llama, fraction):
    total = 80 * GIB
    used = int(torch.randint(1, 20, ()).item()) * GIB + 12345  # the model and whatever else is on the device
    seen = []

    def memory_info(device):
        seen.append(device)
        return total - used, total

    config = EngineSizing(gpu_memory_fraction=fraction).engine_config(tiny_llama, EngineConfig(), memory_info)
    per_block = ModelRunner.kv_bytes_per_block(tiny_llama, EngineConfig().block_size)
    expected = (math.floor(fraction * total) - used) // per_block
    assert config.num_blocks == expected > 0 and config.kv_cache_bytes is None
    assert seen == [tiny_llama.get_input_embeddings().weight.device]
    assert expected * per_block <= fraction * total - used < (expected + 1) * per_block


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_a_quantized_cache_gets_the_blocks_its_bytes_allow(tiny_llama, kind):
    total = 40 * GIB
    used = int(torch.randint(1, 10, ()).item()) * GIB + 999
    config = EngineSizing(gpu_memory_fraction=0.5).engine_config(tiny_llama, EngineConfig(kv_cache=kind),
                                                                 lambda device: (total - used, total))
    block_size = EngineConfig(kv_cache=kind).block_size  # the kind's own (q4: 64)
    per_block = ModelRunner.kv_bytes_per_block(tiny_llama, block_size, kv_cache=kind)
    fixed = ModelRunner.kv_fixed_bytes(tiny_llama, block_size, None, kind, EngineConfig().max_num_seqs)
    assert per_block < ModelRunner.kv_bytes_per_block(tiny_llama, block_size), "a quantized block is smaller"
    assert (fixed > 0) == (kind == "q4"), "q4 alone stages the filling block of each running sequence"
    assert config.kv_cache == kind and config.num_blocks == (total // 2 - used - fixed) // per_block


def test_the_fraction_gives_the_engine_as_many_blocks_as_its_own_byte_budget(tiny_llama):
    """--gpu-memory-fraction and EngineConfig.kv_cache_bytes share one rule: the same bytes give the same blocks."""
    from qtool.runtime.engine import Engine

    total, used = 1 << 24, (1 << 22) + 777
    sizing = EngineSizing(gpu_memory_fraction=0.5, max_batch=3)
    from_fraction = sizing.engine_config(tiny_llama, EngineConfig(kv_cache="q4"), lambda device: (total - used, total))
    by_bytes = Engine(tiny_llama, config=EngineConfig(kv_cache="q4", max_num_seqs=3,
                                                      kv_cache_bytes=total // 2 - used)).num_blocks
    assert from_fraction.num_blocks == by_bytes > 0


def test_nothing_left_is_an_error(tiny_llama):
    with pytest.raises(QtoolError, match="nothing is left"):
        kv_cache_budget(0.5, free=30 * GIB, total=80 * GIB)  # 50 GiB in use, 40 allowed
    per_block = ModelRunner.kv_bytes_per_block(tiny_llama, 16)
    total = 10 * GIB
    almost_all_used = lambda device: (total - (total // 2 - per_block // 2), total)  # noqa: E731
    with pytest.raises(QtoolError, match="less than one block"):
        EngineSizing(gpu_memory_fraction=0.5).engine_config(tiny_llama, EngineConfig(), almost_all_used)


@pytest.mark.parametrize("sizing, message", [
    (EngineSizing(gpu_memory_fraction=0.0), r"must be in \(0, 1\]"),
    (EngineSizing(gpu_memory_fraction=1.5), r"must be in \(0, 1\]"),
    (EngineSizing(gpu_memory_fraction=float("nan")), r"must be in \(0, 1\]"),
    (EngineSizing(cache_blocks=4, gpu_memory_fraction=0.5), "both size the KV cache"),
    (EngineSizing(max_batch=0), "--max-batch 0 must be an integer >= 1"),
    (EngineSizing(gpu_memory_fraction=0.5), "this run is on cpu"),
])
def test_bad_sizes_are_one_line_errors(sizing, message):
    with pytest.raises(QtoolError, match=message):
        sizing.check(torch.device("cpu"))
    EngineSizing(max_batch=2, cache_blocks=8).check(torch.device("cpu"))
