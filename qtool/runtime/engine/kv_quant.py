"""Quantized KV cache storage: the pure quantize/dequantize pair of each kind, the rotation applied before them,
and the per-layer store the paged attention writes new keys/values to and reads a sequence's keys/values from.

- Every (token, kv head) vector is rotated by a fixed orthogonal matrix (a normalized Hadamard matrix when head_dim
  is a power of two, else a seeded random orthogonal one) before it is quantized, and rotated back when read. Keys
  carry a few outlier channels; the rotation spreads them over all channels, so one scale no longer spends its
  range on them. Attention is unchanged by it (q.k and the weighted sum of v are taken after rotating back).
  SmolLM2-135M, wikitext-2, 3 windows of 1024 (float cache 21.428): q8 21.473 unrotated, 21.443 rotated.
- q8: int8 codes, one float16 scale per (token, kv head): symmetric absmax, x ~ code * scale, code in [-127, 127].
- q4 values (per token): 4-bit codes packed two per byte (element 2j in the low nibble, 2j + 1 in the high one),
  and per group of 64 along head_dim (the whole head when 64 does not divide it) a float16 scale and a float16
  minimum: x ~ code * scale + minimum, code in [0, 15]. At 4.5 bits per element it beat symmetric groups of 32
  with one float16 scale each, rotated (22.52 vs 22.86 on the measure above, both with keys so too) and not.
- q4 keys (per channel, KIVI arXiv 2402.02750: keys have outlier channels with an offset of their own, values do
  not): per cache block (64 tokens by default for q4: kv_cache_names.Q4_BLOCK_SIZE), 4-bit codes and per (kv head,
  channel) a float16 scale and a float16 minimum over the block's tokens, not rotated: x ~ code * scale + minimum.
  Stored before RoPE (KVQuant, arXiv 2401.18079) when the model runner gives the cache each layer's RoPE
  (rope.KeyRope; a cache without one stores keys as written): RoPE turns each pair of channels by an angle growing
  with the position, so after it a channel's offset sweeps a range over the block; before it the offset stays put.
  A block is quantized once, when its last row arrives.
- Own block exact (Q4CacheLayer): the block a sequence is filling keeps its keys and values as written in a staging
  slot, and a query reads its own block from there, every earlier block from the codes; a write keeps the exact
  rows of the blocks it touched for the reads of its step, so a chunk that completes a block reads it as a
  one-token decode does: one-chunk prefill (qtool eval --engine), chunked prefill, speculative verification and
  decode see the same numbers.
- Simulated first (bench/runtime/kv_q4_layouts.py; SmolLM2-135M, first 2 windows of 1024 of wikitext-2 test, float
  cache 20.210): float16 scale + minimum per channel before RoPE over 64 tokens with the own block exact 20.239
  (+0.029; every block quantized, as the engine read before: 20.737); the own block's keys exact but its values
  quantized 20.363 (so the values are staged too). Earlier layouts (16-token blocks, every block read quantized):
  rotated int8 zero point per channel and a float16 scale per (block, kv head) before RoPE 20.636 (3.55x, was
  built), after RoPE 22.19 against 21.80 for float16 per channel (3 windows, float 21.428); a float16 scale +
  minimum per channel costs 1.9 bits a key element over 16 tokens (3.05x), 0.5 bits over 64.
- Bytes per (block, kv head) at block_size 64, head_dim 64: keys 2048 + 256 (scales and minima), values 2048 + 256:
  q4 holds 16384 / 4608 = 3.56x the tokens of fp16 in the same bytes, less its fixed staging (max_num_seqs blocks
  of keys and values in the model's dtype: 3.56 x (1 - staging / budget); SmolLM2 in bf16 at 16 sequences 22 MiB,
  3.52x in 2 GiB; a 7B shape at 8 sequences 256 MiB, 3.52x in 24 GiB but 2.66x in 1 GiB).

Quantization is computed in float32; a scale (and minimum) is rounded to float16 before the codes are computed
from it (a q4 key's minimum down, its scale up), so dequantization reproduces exactly the values the codes were
chosen for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qtool.core.errors import QtoolError
from qtool.kernels.engine_ops_ref import Q4_VALUE_GROUP, quantize_q4_ref, quantize_q8_ref
from qtool.runtime.engine.rope import KeyRope

SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
Q4_GROUP = Q4_VALUE_GROUP
_TINY = torch.finfo(torch.float32).tiny  # a zero scale (an all-zero head) divides by this instead: codes 0
_FP16_TINY = 2.0**-24  # the smallest float16 step, for an all-zero block: zero points and codes 0


def q4_group_size(head_dim: int) -> int:
    return Q4_GROUP if head_dim % Q4_GROUP == 0 else head_dim


def rotation(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fixed orthogonal [head_dim, head_dim] float32 matrix: Sylvester's Hadamard matrix / sqrt(head_dim) for a
    power of two, else the Q of a QR decomposition of a Gaussian matrix drawn from seed 0."""
    if head_dim & (head_dim - 1) == 0:
        matrix = torch.ones(1, 1, dtype=torch.float64)
        while matrix.shape[0] < head_dim:
            matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
        matrix = matrix / head_dim**0.5
    else:
        gaussian = torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        matrix = torch.linalg.qr(gaussian).Q
    return matrix.float().to(device)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (codes int8 [..., d], scales float16 [..., 1])."""
    return quantize_q8_ref(x)  # one definition, shared with the decode step's cache write (kernels/engine_ops)


def dequantize_q8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes [..., d], scales [..., 1]) -> float32 [..., d]."""
    return codes.float() * scales.float()


def quantize_q4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] (d even) -> (packed uint8 [..., d / 2], float16 [..., 2 * groups]: each group's scale, then each
    group's minimum)."""
    return quantize_q4_ref(x)  # one definition, shared with the decode step's cache write (kernels/engine_ops)


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(packed [..., d / 2], scales and minima [..., 2 * groups]) -> float32 [..., d]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    scale, minimum = scales.float().unsqueeze(-1).chunk(2, dim=-2)
    grouped = nibbles.float().reshape(*nibbles.shape[:-1], scale.shape[-2], -1) * scale + minimum
    return grouped.reshape(nibbles.shape)


def quantize_q4_channels(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks x [B, block_size, kv_heads, d] (d even), valid [B, block_size] (the rows that hold tokens) -> (packed
    uint8 [B, block_size, kv_heads, d / 2], parameters float16 [B, kv_heads, 2, d]: each channel's scale, then its
    minimum, over the block's valid rows): x ~ code * scale + minimum, code in [0, 15]. The minimum is rounded down
    and the scale up to float16, so the 16 levels cover the channel's whole range."""
    mask = valid[:, :, None, None]
    x = x.float()
    low = torch.where(mask, x, torch.inf).amin(dim=1)
    high = torch.where(mask, x, -torch.inf).amax(dim=1)
    minimum = _round_down_fp16(low)
    scales = _round_up_fp16(((high - minimum.float()) / 15).clamp_min(0))
    step = scales.float().clamp_min(_TINY).unsqueeze(1)
    codes = ((x - minimum.float().unsqueeze(1)) / step).round().clamp(0, 15).masked_fill(~mask, 0)
    nibbles = codes.to(torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4), torch.stack((scales, minimum), dim=-2)


def dequantize_q4_channels(packed: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """(packed [..., kv_heads, d / 2], parameters [..., kv_heads, 2, d] of each row's block) -> float32
    [..., kv_heads, d]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return nibbles.float() * parameters[..., 0, :].float() + parameters[..., 1, :].float()


def _round_down_fp16(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= each element of x (float32)."""
    rounded = x.to(SCALE_DTYPE)
    return torch.where(rounded.float() > x, torch.nextafter(rounded, torch.full_like(rounded, -torch.inf)), rounded)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= each element of x (float32, positive): a scale never narrows the range it covers."""
    rounded = x.to(SCALE_DTYPE)
    return torch.where(rounded.float() < x, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)), rounded)


@dataclass(frozen=True)
class KVQuantScheme:
    """How one quantized kind stores a [..., head_dim] vector: its codes and scales, and their widths."""

    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    dequantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    code_dtype: torch.dtype
    code_width: Callable[[int], int]  # head_dim -> code elements per (token, kv head)
    scale_width: Callable[[int], int]  # head_dim -> float16 scales (and minima) per (token, kv head)


SCHEMES: dict[str, KVQuantScheme] = {
    "q8": KVQuantScheme(quantize_q8, dequantize_q8, torch.int8, lambda d: d, lambda d: 1),
    "q4": KVQuantScheme(quantize_q4, dequantize_q4, torch.uint8, lambda d: d // 2,
                        lambda d: 2 * (d // q4_group_size(d))),
}


def scheme(kind: str, head_dim: int) -> KVQuantScheme:
    if kind not in SCHEMES:
        raise QtoolError(f"KV cache kind {kind!r} is not a quantized kind", hint=f"use one of {', '.join(SCHEMES)}")
    if kind == "q4" and head_dim % 2:
        raise QtoolError(f"a q4 KV cache packs two codes per byte; this model's head_dim is {head_dim}",
                         hint="use --kv-cache q8 (or a float cache) for it")
    return SCHEMES[kind]


def bytes_per_token_head(kind: str, head_dim: int) -> int:
    """Bytes one token's key (or value) of one kv head takes: its codes and its scales."""
    spec = scheme(kind, head_dim)
    code_bytes = torch.empty((), dtype=spec.code_dtype).element_size()
    scale_bytes = torch.empty((), dtype=SCALE_DTYPE).element_size()
    return spec.code_width(head_dim) * code_bytes + spec.scale_width(head_dim) * scale_bytes


@dataclass
class QuantizedCacheLayer:
    """One layer's keys (or values), logically [num_blocks, block_size, kv_heads, head_dim], stored as codes
    [num_blocks, block_size, kv_heads, code_width] and scales [num_blocks, block_size, kv_heads, scale_width]."""

    kind: str
    head_dim: int
    codes: torch.Tensor
    scales: torch.Tensor
    rotation: torch.Tensor  # [head_dim, head_dim] orthogonal: stored codes are of x @ rotation

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical shape, as a float cache of the same layer would have it."""
        return (*self.codes.shape[:3], self.head_dim)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, kv_heads, head_dim] into the flat cache slots [T]."""
        codes, scales = SCHEMES[self.kind].quantize(x.float() @ self.rotation)
        self.codes.view(-1, *self.codes.shape[2:])[slots] = codes
        self.scales.view(-1, *self.scales.shape[2:])[slots] = scales

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized vectors [len(slots), kv_heads, head_dim] at the flat cache slots, in dtype."""
        codes = self.codes.view(-1, *self.codes.shape[2:])[slots]
        scales = self.scales.view(-1, *self.scales.shape[2:])[slots]
        return (SCHEMES[self.kind].dequantize(codes, scales) @ self.rotation.T).to(dtype)


@dataclass
class StagingTable:
    """One layer's record of the blocks held exactly: block -> staging slot, and each slot's filled rows, last
    write and whether its block is full. A full block's slot is retired: its codes hold the block, the slot keeps
    its exact rows only for a rollback (a rejected speculative tail) until another block takes it. Every layer sees
    the same writes, so every layer's table takes the same decisions."""

    slots: int
    block_slot: dict[int, int]
    slot_block: list[int | None]
    slot_rows: list[int]
    slot_used: list[int]
    slot_full: list[bool]
    clock: int = 0

    @classmethod
    def empty(cls, slots: int) -> "StagingTable":
        return cls(slots, {}, [None] * slots, [0] * slots, [0] * slots, [False] * slots)

    def staged(self, block: int) -> int | None:
        """The slot holding block while it is being filled (not a retired one), or None."""
        slot = self.block_slot.get(block)
        return None if slot is None or self.slot_full[slot] else slot

    def take(self, block: int) -> tuple[int | None, int | None, int]:
        """A slot for block: (slot, evicted block being filled or None, its filled rows); slot None when every slot
        holds a block of this write. Taken in this order: a free slot, the retired slot written longest ago, the
        slot of the block being filled that was written longest ago (its rows must then be quantized as they
        are)."""
        free = [s for s in range(self.slots) if self.slot_block[s] is None]
        retired = [s for s in range(self.slots) if self.slot_block[s] is not None and self.slot_full[s]]
        evicted = None
        if free:
            slot = free[0]
        elif retired:
            slot = min(retired, key=self.slot_used.__getitem__)
            del self.block_slot[self.slot_block[slot]]
        else:
            older = [s for s in range(self.slots) if self.slot_used[s] < self.clock]
            if not older:
                return None, None, 0
            slot = min(older, key=self.slot_used.__getitem__)
            evicted = self.slot_block[slot]
            del self.block_slot[evicted]
        self.block_slot[block], self.slot_block[slot] = slot, block
        return slot, evicted, self.slot_rows[slot]

    def place(self, block: int, full: bool) -> tuple[int | None, int | None, int]:
        """Where a write to block keeps its rows: (slot, evicted block being filled or None, its filled rows). The
        block's own slot (staged or retired) where it has one; else, unless the write fills the block, a slot taken
        (take). Q4CacheLayer.write and the decode step's host side (q4_decode.py) both decide through it."""
        slot = self.block_slot.get(block)
        if slot is not None or full:
            return slot, None, 0
        return self.take(block)

    def hold(self, slot: int, rows: int, full: bool) -> None:
        self.slot_rows[slot], self.slot_used[slot], self.slot_full[slot] = rows, self.clock, full

    def copy(self) -> "StagingTable":
        return StagingTable(self.slots, dict(self.block_slot), list(self.slot_block), list(self.slot_rows),
                            list(self.slot_used), list(self.slot_full), self.clock)

    def assign(self, other: "StagingTable") -> None:
        """Take a copy of other's state (every layer's table holds the same decisions)."""
        self.block_slot, self.slot_block = dict(other.block_slot), list(other.slot_block)
        self.slot_rows, self.slot_used = list(other.slot_rows), list(other.slot_used)
        self.slot_full, self.clock = list(other.slot_full), other.clock


@dataclass
class Q4CacheLayer:
    """One layer's q4 keys and values (KIVI, arXiv 2402.02750: keys per channel, values per token), written
    together because one staging table holds both.

    - Keys: per block, 4-bit codes and a float16 scale and minimum per (kv head, channel) over the block's tokens,
      computed once, when the block's last row arrives. With a rope (the model runner always gives one) keys are
      held before RoPE (KVQuant, arXiv 2401.18079: a channel's offset then stays put over the block) and rotated
      back at their positions when read.
    - Values: per token, rotated (see rotation()), QuantizedCacheLayer's q4 codes written at once.
    - The block being filled keeps its keys and values as written (model dtype) in a staging slot. A query reads
      its own block from there and every earlier block from the codes ("own block exact"); a write that touches a
      block keeps its exact rows (`written`) for the reads of the same step, so a chunk that completes a block
      reads that block exact as a one-token decode does: one-chunk prefill, chunked prefill, speculative
      verification and decode all see the same numbers.
    - Staging slots are few (the engine's running sequences). When none is free the block written longest ago is
      quantized as it stands; a later write to a block whose slot is gone (that one, or a full block whose
      speculative tail was rolled back after its retired slot was taken) restages its kept rows from their
      dequantized values: always correct, exact only while slots last."""

    key_codes: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim / 2] uint8
    key_parameters: torch.Tensor  # [num_blocks, kv_heads, 2, head_dim] float16: scale, minimum
    values: QuantizedCacheLayer
    key_staging: torch.Tensor  # [staging slots, block_size, kv_heads, head_dim] model dtype, keys before RoPE
    value_staging: torch.Tensor  # [staging slots, block_size, kv_heads, head_dim] model dtype
    table: StagingTable
    rope: KeyRope | None = None
    # the blocks the last write touched: block -> (keys before RoPE, values) [block_size, kv_heads, head_dim] as
    # staged (rows past the write's end are zero and never read)
    written: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.key_staging.shape[-1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.key_codes.shape[:3], self.head_dim)

    @property
    def block_size(self) -> int:
        return self.key_codes.shape[1]

    def _positions(self, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            raise ValueError("q4 keys stored before RoPE are written and read with their tokens' positions")
        return positions

    def _kept_rows(self, block: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block's first rows as the cache holds them (staged or retired slot: exact; else dequantized): float32
        keys before RoPE and values [rows, kv_heads, head_dim]."""
        slot = self.table.block_slot.get(block)
        if slot is not None:
            return self.key_staging[slot, :rows].float(), self.value_staging[slot, :rows].float()
        keys = dequantize_q4_channels(self.key_codes[block, :rows], self.key_parameters[block])
        slots = torch.arange(block * self.block_size, block * self.block_size + rows, device=keys.device)
        return keys, self.values.read(slots, torch.float32)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor | None = None) -> None:
        """Keys and values [T, kv_heads, head_dim] at the flat cache slots [T] (each block's rows written in one
        run), keys after RoPE at positions [T] (needed with a rope)."""
        if self.rope is not None:
            keys = self.rope.unrotate(keys, self._positions(positions))
        self.values.write(slots, values)  # a value's codes depend on its token alone
        block_size, dtype = self.block_size, self.key_staging.dtype
        self.table.clock += 1
        self.written = {}
        by_block: dict[int, list[tuple[int, int]]] = {}
        for index, slot in enumerate(slots.tolist()):
            by_block.setdefault(slot // block_size, []).append((index, slot % block_size))
        to_store: list[tuple[int, torch.Tensor, int]] = []  # (block, keys before RoPE, rows holding tokens)
        for block, entries in by_block.items():
            indices = torch.tensor([i for i, _ in entries], device=keys.device)
            offsets = torch.tensor([o for _, o in entries], device=keys.device)
            first, end = int(offsets.min()), int(offsets.max()) + 1
            key_rows = torch.zeros(self.shape[1:], dtype=dtype, device=keys.device)
            value_rows = torch.zeros(self.shape[1:], dtype=dtype, device=keys.device)
            if first > 0:
                kept_keys, kept_values = self._kept_rows(block, first)
                key_rows[:first], value_rows[:first] = kept_keys.to(dtype), kept_values.to(dtype)
            key_rows[offsets], value_rows[offsets] = keys[indices].to(dtype), values[indices].to(dtype)
            self.written[block] = (key_rows, value_rows)
            full = end == block_size
            if full:
                to_store.append((block, key_rows.float(), end))
            slot, evicted, evicted_rows = self.table.place(block, full)
            if evicted is not None:
                to_store.append((evicted, self.key_staging[slot].float().clone(), evicted_rows))
            if slot is None and not full:  # every slot holds a block of this very write: quantize it as it stands
                to_store.append((block, key_rows.float(), end))
                continue
            if slot is not None:  # a full block keeps its slot, retired, for a rollback
                self.key_staging[slot, :end], self.value_staging[slot, :end] = key_rows[:end], value_rows[:end]
                self.table.hold(slot, end, full)
        if to_store:
            blocks, contents, rows = zip(*to_store)
            valid = torch.arange(block_size, device=keys.device) < torch.tensor(rows, device=keys.device)[:, None]
            packed, parameters = quantize_q4_channels(torch.stack(contents), valid)
            index = torch.tensor(blocks, dtype=torch.long, device=self.key_codes.device)
            self.key_codes[index], self.key_parameters[index] = packed, parameters

    def _staged_rows(self, slots: torch.Tensor, staging: torch.Tensor, exact: bool,
                     part: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [n, kv_heads, head_dim] float32, which of slots they replace [n] bool) for the slots held exactly:
        in a block being filled, and with exact also in a block the last write touched; None if there are none."""
        block_size = self.block_size
        blocks = torch.div(slots, block_size, rounding_mode="floor")
        unique, inverse = torch.unique(blocks, return_inverse=True)
        sources: list[torch.Tensor | None] = []
        for block in unique.tolist():
            if exact and block in self.written:
                sources.append(self.written[block][part])
            else:
                slot = self.table.staged(block)
                sources.append(None if slot is None else staging[slot])
        if all(source is None for source in sources):
            return None
        empty = torch.zeros(self.shape[1:], dtype=staging.dtype, device=staging.device)
        table = torch.stack([empty if source is None else source for source in sources])
        held = torch.tensor([source is not None for source in sources], device=slots.device)[inverse]
        rows = table.view(-1, *table.shape[2:])[inverse * block_size + slots % block_size]
        return rows.float(), held

    def read_keys(self, slots: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor | None = None,
                  exact: bool = False) -> torch.Tensor:
        """The keys [len(slots), kv_heads, head_dim] at the flat cache slots, in dtype: a full block's dequantized,
        a block being filled as written; with exact, also the blocks the last write touched as written. With a
        rope, rotated by it at positions [len(slots)]."""
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        codes = self.key_codes.view(-1, *self.key_codes.shape[2:])[slots]
        keys = dequantize_q4_channels(codes, self.key_parameters[blocks])
        staged = self._staged_rows(slots, self.key_staging, exact, 0)
        if staged is not None:
            keys = torch.where(staged[1][:, None, None], staged[0], keys)
        if self.rope is not None:
            keys = self.rope.rotate(keys, self._positions(positions))
        return keys.to(dtype)

    def read_values(self, slots: torch.Tensor, dtype: torch.dtype, exact: bool = False) -> torch.Tensor:
        """The values [len(slots), kv_heads, head_dim] at the flat cache slots, in dtype, held as read_keys says."""
        values = self.values.read(slots, torch.float32)
        staged = self._staged_rows(slots, self.value_staging, exact, 1)
        if staged is not None:
            values = torch.where(staged[1][:, None, None], staged[0], values)
        return values.to(dtype)


@dataclass(frozen=True)
class Q4Part:
    """The keys or the values of a Q4CacheLayer, as attention takes a layer's key cache and value cache."""

    layer: Q4CacheLayer
    is_keys: bool
    reads_own_block_exact = True  # attention reads a query's own block through read(exact=True)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.layer.shape

    def read(self, slots: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor | None = None,
             exact: bool = False) -> torch.Tensor:
        if self.is_keys:
            return self.layer.read_keys(slots, dtype, positions, exact)
        return self.layer.read_values(slots, dtype, exact)


@dataclass
class QuantizedKVCache:
    """The quantized counterpart of attention.KVCache: per layer the keys and the values. q8: a QuantizedCacheLayer
    each (per token). q4: a Q4CacheLayer (keys per channel per block, values per token, the blocks being filled
    staged exactly), given to attention as its two Q4Parts. The torch paged attention and the GPU prefill attention
    read it through attention.read_kv. The whole-tensor decode step (and its CUDA graphs) takes q4 through its own
    kernels (engine_ops.rope_and_cache_q4, paged_decode_attention_q4) and its host side (q4_decode.py); q8
    through engine_ops.rope_and_cache_q8 and paged_decode_attention_q8 (queries turned into the stored vectors'
    frame, rows turned back)."""

    kind: str
    head_dim: int
    key_codes: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, code_width]
    # q8: [layers, num_blocks, block_size, kv_heads, 1]; q4: [layers, num_blocks, kv_heads, 2, head_dim] (scale,
    # minimum per channel)
    key_scales: torch.Tensor
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    rotation: torch.Tensor  # [head_dim, head_dim], see rotation()
    key_staging: torch.Tensor | None = None  # q4: [layers, staging slots, block_size, kv_heads, head_dim]
    value_staging: torch.Tensor | None = None  # q4: the same
    tables: list[StagingTable] | None = None  # q4: one per layer
    # q4: each layer's RoPE, set by the model runner: its keys are then stored before RoPE (see Q4CacheLayer)
    key_ropes: list[KeyRope] | None = None
    is_quantized = True

    @classmethod
    def allocate(cls, kind: str, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 device: torch.device | str, staging_slots: int = 1,
                 staging_dtype: torch.dtype = torch.float32) -> "QuantizedKVCache":
        """staging_slots (q4): blocks per layer whose keys and values are held as written while they fill; one per
        running sequence keeps every sequence's own block exact."""
        spec = scheme(kind, head_dim)
        prefix = (num_layers, num_blocks, block_size, kv_heads)

        def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        value_codes = zeros((*prefix, spec.code_width(head_dim)), spec.code_dtype)
        value_scales = zeros((*prefix, spec.scale_width(head_dim)), SCALE_DTYPE)
        if kind == "q8":
            return cls(kind, head_dim, zeros(value_codes.shape, spec.code_dtype), zeros(value_scales.shape, SCALE_DTYPE),
                       value_codes, value_scales, rotation(head_dim, device))
        if staging_slots < 1:
            raise QtoolError(f"a q4 KV cache needs at least one staging slot, got {staging_slots}",
                             hint="give it the engine's max_num_seqs")
        staging = (num_layers, staging_slots, block_size, kv_heads, head_dim)
        return cls(kind, head_dim, zeros((*prefix, head_dim // 2), torch.uint8),
                   zeros((num_layers, num_blocks, kv_heads, 2, head_dim), SCALE_DTYPE), value_codes, value_scales,
                   rotation(head_dim, device), zeros(staging, staging_dtype), zeros(staging, staging_dtype),
                   [StagingTable.empty(staging_slots) for _ in range(num_layers)])

    @staticmethod
    def bytes_per_block(kind: str, num_layers: int, block_size: int, kv_heads: int, head_dim: int) -> int:
        values = block_size * bytes_per_token_head(kind, head_dim)
        keys = values if kind == "q8" else block_size * head_dim // 2 + 2 * head_dim * SCALE_BYTES
        return num_layers * kv_heads * (keys + values)

    @staticmethod
    def staging_bytes(kind: str, num_layers: int, block_size: int, kv_heads: int, head_dim: int, staging_slots: int,
                      staging_dtype: torch.dtype) -> int:
        """Bytes of the q4 cache's staging slots, keys and values (none for q8)."""
        if kind != "q4":
            return 0
        element = torch.empty((), dtype=staging_dtype).element_size()
        return 2 * num_layers * staging_slots * block_size * kv_heads * head_dim * element

    @property
    def block_size(self) -> int:
        return self.key_codes.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.key_codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated codes, scales, minima and staging (the one rotation is not per block)."""
        tensors = (self.key_codes, self.key_scales, self.value_codes, self.value_scales, self.key_staging,
                   self.value_staging)
        return sum(t.nbytes for t in tensors if t is not None)

    def layer(self, index: int) -> tuple[QuantizedCacheLayer | Q4Part, QuantizedCacheLayer | Q4Part]:
        values = QuantizedCacheLayer(self.kind, self.head_dim, self.value_codes[index], self.value_scales[index],
                                     self.rotation)
        if self.kind == "q8":
            return QuantizedCacheLayer(self.kind, self.head_dim, self.key_codes[index], self.key_scales[index],
                                       self.rotation), values
        layer = Q4CacheLayer(self.key_codes[index], self.key_scales[index], values, self.key_staging[index],
                             self.value_staging[index], self.tables[index],
                             self.key_ropes[index] if self.key_ropes else None)
        return Q4Part(layer, True), Q4Part(layer, False)
