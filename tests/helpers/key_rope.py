"""A KeyRope for cache tests without a model: the standard rotary tables (Llama's, base 10000) computed in float64
from first principles, independent of transformers' rotary modules."""

from __future__ import annotations

import torch

from qtool.runtime.engine.rope import KeyRope


def standard_key_rope(head_dim: int, base: float = 10000.0, layout: str = "half") -> KeyRope:
    inverse = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.double().cpu()[:, None] * inverse[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().float().to(positions.device), angles.sin().float().to(positions.device)

    return KeyRope(tables, layout)


def rope_float64(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x [n, heads, d] rotated by the standard RoPE ("half" pairs) at positions [n], in float64."""
    d = x.shape[-1]
    inverse = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None, None] * inverse
    first, second = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat((first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()), -1)
