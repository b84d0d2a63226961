"""RoPE as the engine applies it: the rotation of q/k by the rotary module's cos/sin (both pair layouts, partial
rotary dims), and KeyRope, which a q4 cache uses to store keys before RoPE and rotate them back when read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """x [T, heads, d] rotated by cos/sin [T, r] (the rotary module's, "half" or "interleaved" pairs): the first r
    dims of each head (r < d: a partial rotary embedding, Phi-3's), the others passed through. -sin rotates back."""
    width = cos.shape[-1]
    rotated, passed = x[..., :width], x[..., width:]
    if layout == "interleaved":
        cos = cos[..., : width // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : width // 2].repeat_interleave(2, dim=-1)
        rotated = rotated * cos.unsqueeze(1) + rotate_pairs(rotated) * sin.unsqueeze(1)
    else:
        rotated = rotated * cos.unsqueeze(1) + rotate_half(rotated) * sin.unsqueeze(1)
    return rotated if passed.shape[-1] == 0 else torch.cat((rotated, passed), dim=-1)


@dataclass(frozen=True)
class KeyRope:
    """One layer's RoPE for keys stored before it: tables(positions [n]) -> float32 (cos, sin) [n, r], the model's
    own rotary module at those positions (its scaling variant, its layer type)."""

    tables: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    layout: str = "half"

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys before RoPE [n, kv_heads, d] at positions [n] -> after it (float32)."""
        cos, sin = self.tables(positions)
        return apply_rope(x.float(), cos, sin, self.layout)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys after RoPE [n, kv_heads, d] at positions [n] -> before it (float32)."""
        cos, sin = self.tables(positions)
        return apply_rope(x.float(), cos, -sin, self.layout)
