"""How big `qtool run` makes the engine: the most sequences in the running batch (--max-batch), and the KV cache as a
number of blocks (--cache-blocks) or as what a fraction of the GPU's memory leaves once the model is loaded
(--gpu-memory-fraction); checked before the model loads, resolved to an EngineConfig after."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.runtime.engine import EngineConfig
from qtool.runtime.engine.model_runner import ModelRunner

GIB = 1 << 30
MemoryInfo = Callable[[torch.device], tuple[int, int]]  # (free, total) bytes of a device


@dataclass(frozen=True)
class EngineSizing:
    max_batch: int | None = None  # EngineConfig.max_num_seqs
    cache_blocks: int | None = None  # EngineConfig.num_blocks
    gpu_memory_fraction: float | None = None  # of the GPU's total memory, for the whole process

    def check(self, device: torch.device) -> None:
        """One-line errors for what no model can change: counts, the fraction's range, both cache sizes, a fraction
        of a GPU's memory on the CPU."""
        for flag, value in (("--max-batch", self.max_batch), ("--cache-blocks", self.cache_blocks)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise QtoolError(f"{flag} {value} must be an integer >= 1", f"e.g. {flag} 16")
        fraction = self.gpu_memory_fraction
        if fraction is None:
            return
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction <= 1):
            raise QtoolError(f"--gpu-memory-fraction {fraction} must be in (0, 1]", "e.g. --gpu-memory-fraction 0.9")
        if self.cache_blocks is not None:
            raise QtoolError("--cache-blocks and --gpu-memory-fraction both size the KV cache", "give one of them")
        if device.type != "cuda":
            raise QtoolError(f"--gpu-memory-fraction sizes the KV cache from a GPU's memory, and this run is on "
                             f"{device.type}", "give --cache-blocks N instead, or run on a CUDA device")

    def engine_config(self, model: nn.Module, base: EngineConfig = EngineConfig(),
                      memory_info: MemoryInfo | None = None) -> EngineConfig:
        """`base` with these settings, the cache from GPU memory measured now (call it after the model is loaded).
        memory_info: (free, total) of a device, torch.cuda.mem_get_info unless given."""
        changes: dict[str, Any] = {}
        if self.max_batch is not None:
            changes["max_num_seqs"] = self.max_batch
        if self.cache_blocks is not None:
            changes.update(num_blocks=self.cache_blocks, kv_cache_bytes=None)
        if self.gpu_memory_fraction is not None:
            device = model.get_input_embeddings().weight.device
            if memory_info is None:
                self.check(device)
                memory_info = torch.cuda.mem_get_info
            free, total = memory_info(device)
            budget = kv_cache_budget(self.gpu_memory_fraction, free, total)
            max_seqs = changes.get("max_num_seqs", base.max_num_seqs)
            per_block = ModelRunner.kv_bytes_per_block(model, base.block_size, base.kv_dtype, base.kv_cache)
            # q4 stages the block each running sequence is filling outside the blocks (Engine._blocks_for_budget's rule)
            fixed = ModelRunner.kv_fixed_bytes(model, base.block_size, base.kv_dtype, base.kv_cache, max_seqs)
            if budget - fixed < per_block:
                staging = (f" besides {fixed} bytes of q4 staging (a block of keys and values per sequence)"
                           if fixed else "")
                raise QtoolError(f"--gpu-memory-fraction {self.gpu_memory_fraction} leaves {budget / GIB:.2f} GiB "
                                 f"for the KV cache, less than one block ({per_block} bytes){staging}",
                                 "raise --gpu-memory-fraction, or give --cache-blocks N")
            changes.update(num_blocks=(budget - fixed) // per_block, kv_cache_bytes=None)
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def kv_cache_budget(fraction: float, free: int, total: int) -> int:
    """Bytes the KV cache may take: `fraction` of the device's total memory, less what is in use now (the loaded
    model, this process's other tensors and anything else on the device). A QtoolError when nothing is left."""
    in_use = total - free
    budget = int(fraction * total) - in_use
    if budget <= 0:
        raise QtoolError(f"--gpu-memory-fraction {fraction} allows {fraction * total / GIB:.2f} GiB of the GPU's "
                         f"{total / GIB:.2f} GiB, and {in_use / GIB:.2f} GiB are in use already (the model "
                         "included): nothing is left for the KV cache",
                         "raise --gpu-memory-fraction, or give --cache-blocks N")
    return budget


def engine_report(config: EngineConfig, num_blocks: int | None, sizing: EngineSizing) -> dict[str, Any]:
    """What --json says of the engine a run had: its batch cap, its KV cache blocks (None: no engine ran) and the
    GPU memory fraction asked for."""
    return {"max_batch": config.max_num_seqs, "cache_blocks": num_blocks,
            "gpu_memory_fraction": sizing.gpu_memory_fraction}
