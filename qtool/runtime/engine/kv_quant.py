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
  not): per block of block_size tokens, rotated 4-bit codes, an int8 zero point per (kv head, channel) and one
  float16 scale per (kv head): x ~ (code + zero) * scale. A block is quantized once, when its last row arrives;
  until then its keys sit as written in a staging slot (ChannelQuantizedKeys). Measured (3 windows, float 21.428,
  values as above): keys per token 22.52; per channel over the block, rotated, zero point per channel and a scale
  per head 22.19 (this layout); a float16 scale and minimum per channel (not rotated) 21.80 and the same in fp8
  21.85, but those take 1.9 bits per key element and drop q4 under 3.5x fp16's tokens; symmetric per channel 22.47
  (the offsets need a zero point); a power-of-two factor per channel on the head's scale (2 more bits a channel,
  no room left for the staging) 22.03 unrotated, 22.12 rotated.
- q4 keys are stored before RoPE (KVQuant, arXiv 2401.18079) when the model runner gives the cache each layer's RoPE
  (rope.KeyRope; a cache without one stores keys as written): RoPE turns each pair of channels by an angle growing
  with the position, so after it a channel's offset sweeps a range over the block's 16 tokens; before it the offset
  stays put and the zero point absorbs it. A write un-rotates the keys at their positions, a read rotates them back
  (codes and staging alike, so a staged key reads back within float rounding of the staging dtype). Simulated on the
  first 2 windows of 1024 (float cache 20.210, values q4 alone 20.310; bench/runtime/kv_q4_layouts.py): this layout
  before RoPE 20.636; the same not rotated 21.364; a float16 scale + minimum per channel 20.645 after RoPE, 20.385
  before it; zero points with a step of their own (not tied to the codes' step) before RoPE, rotated 20.731.
- Bytes per (block, kv head) at block_size 16, head_dim 64: keys 512 + 64 + 2, values 512 + 64: q4 holds
  4096 / 1154 = 3.55x the tokens of fp16 in the same bytes, less its fixed staging (max_num_seqs blocks of keys
  in the model's dtype: SmolLM2 at 64 sequences in bf16 11.8 MB, 0.6% of a 2 GiB cache).

Quantization is computed in float32; a scale (and minimum) is rounded to float16 before the codes are computed
from it, so dequantization reproduces exactly the values the codes were chosen for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine.rope import KeyRope

SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
Q4_GROUP = 64
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
    x = x.float()
    scales = (x.abs().amax(dim=-1, keepdim=True) / 127).to(SCALE_DTYPE)
    codes = (x / scales.float().clamp_min(_TINY)).round().clamp(-127, 127)
    return codes.to(torch.int8), scales


def dequantize_q8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes [..., d], scales [..., 1]) -> float32 [..., d]."""
    return codes.float() * scales.float()


def quantize_q4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] (d even) -> (packed uint8 [..., d / 2], float16 [..., 2 * groups]: each group's scale, then each
    group's minimum)."""
    head_dim = x.shape[-1]
    group = q4_group_size(head_dim)
    grouped = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    minimum = grouped.amin(dim=-1, keepdim=True).to(SCALE_DTYPE)
    scales = ((grouped.amax(dim=-1, keepdim=True) - minimum.float()) / 15).to(SCALE_DTYPE)
    codes = ((grouped - minimum.float()) / scales.float().clamp_min(_TINY)).round().clamp(0, 15)
    nibbles = codes.to(torch.uint8).reshape(*x.shape[:-1], head_dim // 2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4), torch.cat((scales, minimum), dim=-2).squeeze(-1)


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(packed [..., d / 2], scales and minima [..., 2 * groups]) -> float32 [..., d]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    scale, minimum = scales.float().unsqueeze(-1).chunk(2, dim=-2)
    grouped = nibbles.float().reshape(*nibbles.shape[:-1], scale.shape[-2], -1) * scale + minimum
    return grouped.reshape(nibbles.shape)


def quantize_q4_channels(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks x [B, block_size, kv_heads, d] (d even), valid [B, block_size] (the rows that hold tokens) -> (packed
    uint8 [B, block_size, kv_heads, d / 2], zero points int8 [B, kv_heads, d], scales float16 [B, kv_heads, 1]):
    x ~ (code + zero) * scale, code in [0, 15], one zero point per channel over the block's valid rows and one
    scale per (block, kv head). The scale covers the widest channel in 14 steps (a floored zero point can start up
    to a step below the channel's minimum) and keeps |x| / scale <= 127 (zero points fit int8)."""
    mask = valid[:, :, None, None]
    x = x.float()
    low = torch.where(mask, x, torch.inf).amin(dim=1)
    high = torch.where(mask, x, -torch.inf).amax(dim=1)
    needed = torch.maximum((high - low) / 14, torch.maximum(low.abs(), high.abs()) / 127).amax(dim=-1, keepdim=True)
    scales = _round_up_fp16(needed.clamp_min(_FP16_TINY))
    step = scales.float()
    zeros = torch.floor(low / step).clamp(-128, 127)
    codes = ((x / step.unsqueeze(1)).round() - zeros.unsqueeze(1)).clamp(0, 15).masked_fill(~mask, 0)
    nibbles = codes.to(torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4), zeros.to(torch.int8), scales


def dequantize_q4_channels(packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(packed [..., d / 2], zero points [..., d], scales [..., 1]) of the same rows -> float32 [..., d]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return (nibbles.float() + zeros.float()) * scales.float()


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
    """One layer's record of which blocks are being filled: block -> staging slot, and each slot's filled rows and
    last write. Every layer sees the same writes, so every layer's table takes the same decisions."""

    slots: int
    block_slot: dict[int, int]
    slot_block: list[int | None]
    slot_rows: list[int]
    slot_used: list[int]
    clock: int = 0

    @classmethod
    def empty(cls, slots: int) -> "StagingTable":
        return cls(slots, {}, [None] * slots, [0] * slots, [0] * slots)

    def release(self, block: int) -> None:
        slot = self.block_slot.pop(block)
        self.slot_block[slot] = None

    def take(self, block: int) -> tuple[int | None, int | None, int]:
        """A slot for block: (slot, evicted block or None, its filled rows); slot None when every slot is in use by
        this write. The evicted block is the one written longest ago: its rows must be quantized as they are."""
        free = [s for s in range(self.slots) if self.slot_block[s] is None]
        if free:
            slot, evicted = free[0], None
        else:
            older = [s for s in range(self.slots) if self.slot_used[s] < self.clock]
            if not older:
                return None, None, 0
            slot = min(older, key=self.slot_used.__getitem__)
            evicted = self.slot_block[slot]
            del self.block_slot[evicted]
        self.block_slot[block], self.slot_block[slot] = slot, block
        return slot, evicted, self.slot_rows[slot]


@dataclass
class ChannelQuantizedKeys:
    """One layer's q4 keys, logically [num_blocks, block_size, kv_heads, head_dim] (KIVI, arXiv 2402.02750: keys
    per channel, values per token). A full block is stored as rotated 4-bit codes with a zero point per (kv head,
    channel) and a scale per kv head over its block_size tokens; a block still being filled keeps its keys as
    written in a staging slot (exact) until its last row arrives, then the whole block is quantized at once, so a
    block's codes depend only on its tokens (not on how prefill was chunked). Staging slots are few (the engine's
    running sequences); when all are taken the block written longest ago is quantized as it stands, and a later
    write to a quantized block that is not full (that one, or a block whose speculative tail was rolled back)
    restages its kept rows from their dequantized values: always correct, exact tails only while slots last.
    With a rope (the model runner always gives one) everything is held before RoPE: a write un-rotates the keys at
    their positions, a read rotates the rows back at theirs (KVQuant, arXiv 2401.18079). A chunk that completes a
    block reads that block quantized, where a one-token decode reads its own block staged: the two agree within the
    q4 error, not bit for bit."""

    head_dim: int
    codes: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim / 2] uint8
    zeros: torch.Tensor  # [num_blocks, kv_heads, head_dim] int8
    scales: torch.Tensor  # [num_blocks, kv_heads, 1] float16
    staging: torch.Tensor  # [staging slots, block_size, kv_heads, head_dim], the keys as written (model dtype)
    table: StagingTable
    rotation: torch.Tensor
    rope: KeyRope | None = None  # keys stored before RoPE (codes and staging alike), rotated by it when read

    def _positions(self, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            raise ValueError("q4 keys stored before RoPE are written and read with their tokens' positions")
        return positions

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.codes.shape[:3], self.head_dim)

    def _dequantized_rows(self, block: int, rows: int) -> torch.Tensor:
        """Block's first rows, dequantized and rotated back: float32 [rows, kv_heads, head_dim]."""
        codes = self.codes[block, :rows]
        return dequantize_q4_channels(codes, self.zeros[block], self.scales[block]) @ self.rotation.T

    def write(self, slots: torch.Tensor, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Keys x [T, kv_heads, head_dim] at the flat cache slots [T] (each block's rows written in one run), after
        RoPE at positions [T] (needed with a rope)."""
        if self.rope is not None:
            x = self.rope.unrotate(x, self._positions(positions))
        block_size = self.codes.shape[1]
        self.table.clock += 1
        by_block: dict[int, list[tuple[int, int]]] = {}
        for index, slot in enumerate(slots.tolist()):
            by_block.setdefault(slot // block_size, []).append((index, slot % block_size))
        to_store: list[tuple[int, torch.Tensor, int]] = []  # (block, content, rows holding tokens)
        for block, entries in by_block.items():
            indices = torch.tensor([i for i, _ in entries], device=x.device)
            offsets = torch.tensor([o for _, o in entries], device=x.device)
            first, end = int(offsets.min()), int(offsets.max()) + 1
            slot = self.table.block_slot.get(block)
            content = torch.zeros(self.shape[1:], dtype=torch.float32, device=x.device)
            if first > 0:  # the kept rows: as written while staged, else (quantized earlier) dequantized
                content[:first] = (self.staging[slot, :first].float() if slot is not None
                                   else self._dequantized_rows(block, first))
            content[offsets] = x[indices].float()
            if end == block_size:
                if slot is not None:
                    self.table.release(block)
                to_store.append((block, content, end))
                continue
            if slot is None:
                slot, evicted, evicted_rows = self.table.take(block)
                if evicted is not None:
                    to_store.append((evicted, self.staging[slot].float().clone(), evicted_rows))
            if slot is None:  # every slot holds a block of this very write: quantize this one as it stands
                to_store.append((block, content, end))
                continue
            self.staging[slot, :end] = content[:end].to(self.staging.dtype)
            self.table.slot_rows[slot], self.table.slot_used[slot] = end, self.table.clock
        if to_store:
            blocks, contents, rows = zip(*to_store)
            valid = torch.arange(block_size, device=x.device) < torch.tensor(rows, device=x.device)[:, None]
            packed, zeros, scales = quantize_q4_channels(torch.stack(contents) @ self.rotation, valid)
            index = torch.tensor(blocks, dtype=torch.long, device=self.codes.device)
            self.codes[index], self.zeros[index], self.scales[index] = packed, zeros, scales

    def read(self, slots: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The keys [len(slots), kv_heads, head_dim] at the flat cache slots, in dtype: a staged block's as
        written, a quantized block's dequantized; with a rope, rotated by it at positions [len(slots)]."""
        block_size = self.codes.shape[1]
        blocks = torch.div(slots, block_size, rounding_mode="floor")
        codes = self.codes.view(-1, *self.codes.shape[2:])[slots]
        keys = dequantize_q4_channels(codes, self.zeros[blocks], self.scales[blocks]) @ self.rotation.T
        if self.table.block_slot:
            unique, inverse = torch.unique(blocks, return_inverse=True)
            slot_of = [self.table.block_slot.get(block, -1) for block in unique.tolist()]
            staged = torch.tensor(slot_of, dtype=torch.long, device=slots.device)[inverse]
            rows = (staged.clamp_min(0) * block_size + slots % block_size)
            from_staging = self.staging.view(-1, *self.staging.shape[2:])[rows].float()
            keys = torch.where((staged >= 0)[:, None, None], from_staging, keys)
        if self.rope is not None:
            keys = self.rope.rotate(keys, self._positions(positions))
        return keys.to(dtype)


@dataclass
class QuantizedKVCache:
    """The quantized counterpart of attention.KVCache: per layer the keys and the values. q8: a QuantizedCacheLayer
    each (per token). q4: keys per channel (ChannelQuantizedKeys, with their staging slots), values per token. The
    torch paged attention and the GPU prefill attention read it through attention.read_kv; is_quantized makes the
    whole-tensor decode step (engine_ops: float caches only) and its CUDA graphs decline it."""

    kind: str
    head_dim: int
    key_codes: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, code_width]
    key_scales: torch.Tensor  # q8: [layers, num_blocks, block_size, kv_heads, 1]; q4: [layers, num_blocks, kv_heads, 1]
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    rotation: torch.Tensor  # [head_dim, head_dim], see rotation()
    key_zeros: torch.Tensor | None = None  # q4: [layers, num_blocks, kv_heads, head_dim] int8
    key_staging: torch.Tensor | None = None  # q4: [layers, staging slots, block_size, kv_heads, head_dim]
    tables: list[StagingTable] | None = None  # q4: one per layer
    # q4: each layer's RoPE, set by the model runner: its keys are then stored before RoPE (see the module's doc)
    key_ropes: list[KeyRope] | None = None
    is_quantized = True

    @classmethod
    def allocate(cls, kind: str, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 device: torch.device | str, staging_slots: int = 1,
                 staging_dtype: torch.dtype = torch.float32) -> "QuantizedKVCache":
        """staging_slots (q4): blocks per layer whose keys are held as written while they fill, at most one per
        running sequence is ever needed."""
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
        return cls(kind, head_dim, zeros((*prefix, head_dim // 2), torch.uint8),
                   zeros((num_layers, num_blocks, kv_heads, 1), SCALE_DTYPE), value_codes, value_scales,
                   rotation(head_dim, device), zeros((num_layers, num_blocks, kv_heads, head_dim), torch.int8),
                   zeros((num_layers, staging_slots, block_size, kv_heads, head_dim), staging_dtype),
                   [StagingTable.empty(staging_slots) for _ in range(num_layers)])

    @staticmethod
    def bytes_per_block(kind: str, num_layers: int, block_size: int, kv_heads: int, head_dim: int) -> int:
        values = block_size * bytes_per_token_head(kind, head_dim)
        keys = values if kind == "q8" else block_size * head_dim // 2 + head_dim + SCALE_BYTES
        return num_layers * kv_heads * (keys + values)

    @staticmethod
    def staging_bytes(kind: str, num_layers: int, block_size: int, kv_heads: int, head_dim: int, staging_slots: int,
                      staging_dtype: torch.dtype) -> int:
        """Bytes of the q4 keys' staging slots (none for q8)."""
        if kind != "q4":
            return 0
        element = torch.empty((), dtype=staging_dtype).element_size()
        return num_layers * staging_slots * block_size * kv_heads * head_dim * element

    @property
    def block_size(self) -> int:
        return self.key_codes.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.key_codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated codes, scales, zero points and staging (the one rotation is not per block)."""
        tensors = (self.key_codes, self.key_scales, self.value_codes, self.value_scales, self.key_zeros,
                   self.key_staging)
        return sum(t.nbytes for t in tensors if t is not None)

    def layer(self, index: int) -> tuple[QuantizedCacheLayer | ChannelQuantizedKeys, QuantizedCacheLayer]:
        values = QuantizedCacheLayer(self.kind, self.head_dim, self.value_codes[index], self.value_scales[index],
                                     self.rotation)
        if self.kind == "q8":
            return QuantizedCacheLayer(self.kind, self.head_dim, self.key_codes[index], self.key_scales[index],
                                       self.rotation), values
        return ChannelQuantizedKeys(self.head_dim, self.key_codes[index], self.key_zeros[index],
                                    self.key_scales[index], self.key_staging[index], self.tables[index],
                                    self.rotation, self.key_ropes[index] if self.key_ropes else None), values
