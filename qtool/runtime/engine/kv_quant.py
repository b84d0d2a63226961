"""Quantized KV cache storage: the pure quantize/dequantize pair of each kind and the per-layer store the paged
attention writes new keys/values to and reads a sequence's keys/values from.

- q8: int8 codes, one float16 scale per (token, kv head): symmetric absmax, x ~ code * scale, code in [-127, 127].
- q4: 4-bit codes packed two per byte (element 2j in the low nibble, 2j + 1 in the high one), one float16 scale per
  group of 32 along head_dim (the whole head when 32 does not divide it): symmetric absmax, code in [-7, 7] stored
  as code + 8. Why this layout: at the same bytes (4.5 bits per element for head_dim 64) it beat one asymmetric
  scale + zero per (token, kv head): keys carry a few outlier channels, and a per-head range spends most of the 16
  levels on them, while groups of 32 keep an outlier's range inside its own group (SmolLM2 wikitext-2, see
  RESULTS.md). The float16 scales cost 2 bytes per 32 codes, so q4 holds 2 * 32 / (16 + 2) = 3.56x the tokens
  of an fp16 cache in the same bytes.

Quantization is computed in float32; a scale is rounded to float16 before the codes are computed from it, so
dequantization reproduces exactly the values the codes were chosen for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qtool.core.errors import QtoolError

SCALE_DTYPE = torch.float16
Q4_GROUP = 32
_TINY = torch.finfo(torch.float32).tiny  # a zero scale (an all-zero head) divides by this instead: codes 0


def q4_group_size(head_dim: int) -> int:
    return Q4_GROUP if head_dim % Q4_GROUP == 0 else head_dim


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
    """x [..., d] (d even) -> (packed uint8 [..., d / 2], scales float16 [..., d / group])."""
    head_dim = x.shape[-1]
    group = q4_group_size(head_dim)
    grouped = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    scales = (grouped.abs().amax(dim=-1, keepdim=True) / 7).to(SCALE_DTYPE)
    codes = (grouped / scales.float().clamp_min(_TINY)).round().clamp(-7, 7)
    nibbles = (codes + 8).to(torch.uint8).reshape(*x.shape[:-1], head_dim // 2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4), scales.squeeze(-1)


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(packed [..., d / 2], scales [..., groups]) -> float32 [..., d]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    codes = nibbles.float() - 8
    groups = scales.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], groups, -1) * scales.float().unsqueeze(-1)
    return grouped.reshape(codes.shape)


@dataclass(frozen=True)
class KVQuantScheme:
    """How one quantized kind stores a [..., head_dim] vector: its codes and scales, and their widths."""

    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    dequantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    code_dtype: torch.dtype
    code_width: Callable[[int], int]  # head_dim -> code elements per (token, kv head)
    scale_width: Callable[[int], int]  # head_dim -> scales per (token, kv head)


SCHEMES: dict[str, KVQuantScheme] = {
    "q8": KVQuantScheme(quantize_q8, dequantize_q8, torch.int8, lambda d: d, lambda d: 1),
    "q4": KVQuantScheme(quantize_q4, dequantize_q4, torch.uint8, lambda d: d // 2, lambda d: d // q4_group_size(d)),
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

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical shape, as a float cache of the same layer would have it."""
        return (*self.codes.shape[:3], self.head_dim)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, kv_heads, head_dim] into the flat cache slots [T]."""
        codes, scales = SCHEMES[self.kind].quantize(x)
        self.codes.view(-1, *self.codes.shape[2:])[slots] = codes
        self.scales.view(-1, *self.scales.shape[2:])[slots] = scales

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized vectors [len(slots), kv_heads, head_dim] at the flat cache slots, in dtype."""
        codes = self.codes.view(-1, *self.codes.shape[2:])[slots]
        scales = self.scales.view(-1, *self.scales.shape[2:])[slots]
        return SCHEMES[self.kind].dequantize(codes, scales).to(dtype)


@dataclass
class QuantizedKVCache:
    """The quantized counterpart of attention.KVCache: per layer a QuantizedCacheLayer for keys and one for values.
    Only the torch paged attention reads it (is_quantized routes the fast float paths away from it)."""

    kind: str
    head_dim: int
    key_codes: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, code_width]
    key_scales: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, scale_width]
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    is_quantized = True

    @classmethod
    def allocate(cls, kind: str, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 device: torch.device | str) -> "QuantizedKVCache":
        spec = scheme(kind, head_dim)
        prefix = (num_layers, num_blocks, block_size, kv_heads)

        def zeros(width: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((*prefix, width), dtype=dtype, device=device)

        codes, scales = (spec.code_width(head_dim), spec.code_dtype), (spec.scale_width(head_dim), SCALE_DTYPE)
        return cls(kind, head_dim, zeros(*codes), zeros(*scales), zeros(*codes), zeros(*scales))

    @staticmethod
    def bytes_per_block(kind: str, num_layers: int, block_size: int, kv_heads: int, head_dim: int) -> int:
        return 2 * num_layers * block_size * kv_heads * bytes_per_token_head(kind, head_dim)

    @property
    def block_size(self) -> int:
        return self.key_codes.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.key_codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated tensors."""
        return sum(t.nbytes for t in (self.key_codes, self.key_scales, self.value_codes, self.value_scales))

    def layer(self, index: int) -> tuple[QuantizedCacheLayer, QuantizedCacheLayer]:
        return (QuantizedCacheLayer(self.kind, self.head_dim, self.key_codes[index], self.key_scales[index]),
                QuantizedCacheLayer(self.kind, self.head_dim, self.value_codes[index], self.value_scales[index]))
