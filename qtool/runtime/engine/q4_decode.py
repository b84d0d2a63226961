"""The q4 cache's host side of the whole-tensor decode step (decode_step.py, and its CUDA graphs in cuda_graphs.py).

A decode step writes one token per sequence. With a q4 cache that write keeps the key (before RoPE) and the value
in the sequence's staging slot and the value's codes at its cache slot, and the step's attention reads the own
block from the slot (kernels/engine_ops: rope_and_cache_q4, paged_decode_attention_q4). What else a write does
(Q4CacheLayer.write) is decided here, on the host, around the step:

- Before it (plan_q4_decode): each row's staging slot, decided by the staging table as the module path decides it
  (StagingTable.place, in the same row order, once for all layers: every layer sees the same writes); a block
  evicted to free a slot is quantized as it stands now, before the step overwrites its slot.
- After it (finish_q4_decode): the blocks the step filled are quantized from their slots (keys per channel), all
  layers at once, on the same stream, before any later step reads them from their codes.

Why outside the graph and not a masked op inside it: positions are host-known, so the host knows which rows start
or fill a block before the step; the graph stays a fixed-shape write + attention, and a block's quantization (one
row in block_size steps) costs nothing on the other steps, where an in-graph masked reduction would run every step.
A write only the module path does makes plan_q4_decode return None and that step runs through the modules: a row's
block has no slot but earlier rows (they would be restaged from their codes), more rows than staging slots, or a
row given the slot another row of the step fills and retires (the module path holds the filled block's rows in
hand; the step would overwrite them in the slot). With a slot per running sequence these are rare: a sequence
starting a block normally takes the older slot its previous block retired in an earlier step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.runtime.engine.kv_quant import QuantizedKVCache, quantize_q4_channels

QUANTIZE_CHUNK_BYTES = 64 << 20  # float32 keys quantized at once (layers x blocks), so the temporaries stay small


@dataclass(frozen=True)
class Q4DecodePlan:
    """A decode step's q4 writes: each row's staging slot, and the (block, staging slot) pairs it fills."""

    staging_slots: list[int]
    filled: list[tuple[int, int]]


def plan_q4_decode(cache: QuantizedKVCache, slots: list[int]) -> Q4DecodePlan | None:
    """The staging slots of a decode step writing one token at each of the flat cache slots (one per sequence), the
    tables of every layer updated and any evicted block quantized; None (nothing changed) when a row needs what only
    Q4CacheLayer.write does."""
    block_size = cache.block_size
    trial = cache.tables[0].copy()
    trial.clock += 1  # one write, as each layer's write_kv counts it
    staging, filled, evicted = [], [], []
    for slot in slots:
        block, offset = divmod(slot, block_size)
        full = offset == block_size - 1
        if offset > 0 and block not in trial.block_slot:
            return None  # its first rows are gone from staging: the module path restages them from their codes
        place, gone, gone_rows = trial.place(block, full)
        if place is None:
            return None  # no slot to keep it in: the module path quantizes it as it stands
        if place in staging:
            # the slot of a block this step fills, retired and taken again at once: the module path quantizes
            # that block from the rows it holds in hand; here the step would overwrite them before it reads them
            return None
        if gone is not None:
            evicted.append((gone, place, gone_rows))
        trial.hold(place, offset + 1, full)
        staging.append(place)
        if full:
            filled.append((block, place))
    if evicted:
        quantize_staged_keys(cache, evicted)
    for table in cache.tables:
        table.assign(trial)
    return Q4DecodePlan(staging, filled)


def finish_q4_decode(cache: QuantizedKVCache, plan: Q4DecodePlan) -> None:
    """After the step: the blocks it filled quantized from their staging slots (which stay, retired)."""
    if plan.filled:
        quantize_staged_keys(cache, [(block, slot, cache.block_size) for block, slot in plan.filled])


def quantize_staged_keys(cache: QuantizedKVCache, entries: list[tuple[int, int, int]]) -> None:
    """(block, staging slot, rows) -> the slot's first rows of keys quantized into the block's codes and parameters,
    every layer (what Q4CacheLayer.write stores for a block it fills or evicts)."""
    device = cache.key_codes.device
    blocks = torch.tensor([block for block, _, _ in entries], dtype=torch.long, device=device)
    slots = torch.tensor([slot for _, slot, _ in entries], dtype=torch.long, device=device)
    rows = torch.tensor([count for _, _, count in entries], device=device)
    valid = torch.arange(cache.block_size, device=device) < rows[:, None]  # [n, block_size]
    layers = cache.key_staging.shape[0]
    per_layer = len(entries) * cache.key_staging[0, 0].numel() * 4
    step = max(1, QUANTIZE_CHUNK_BYTES // per_layer)
    for first in range(0, layers, step):
        chunk = slice(first, min(first + step, layers))
        keys = cache.key_staging[chunk][:, slots]  # [l, n, block_size, kv_heads, d]
        count = keys.shape[0]
        packed, parameters = quantize_q4_channels(keys.flatten(0, 1), valid.repeat(count, 1))
        cache.key_codes[chunk, blocks] = packed.view(count, len(entries), *packed.shape[1:])
        cache.key_scales[chunk, blocks] = parameters.view(count, len(entries), *parameters.shape[1:])
