"""A decoder layer's parts in the plain forms fused code can compute them in, decided by probing the modules (what
they compute, whatever their classes are called): an RMSNorm as its weight, eps and weight offset, and a gated MLP
as down(act(gate(x)) * up(x)). The engine's decode step and the fine-tuning step's fused forward both plan from
these."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtool.kernels.engine_ops import add_rms_norm
from qtool.kernels.engine_ops_ref import add_rms_norm_ref

NORM_WEIGHT_OFFSETS = (0.0, 1.0)  # weight as is (Llama), or 1 + weight (Gemma)
MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


@dataclass(frozen=True)
class RmsNorm:
    """An RMSNorm module as add_rms_norm's arguments."""

    weight: torch.Tensor
    eps: float
    weight_offset: float

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)


def rms_norm_form(module: nn.Module) -> RmsNorm | None:
    """The module as an RMSNorm (weight, eps, weight offset) if it computes one, else None. Decided by running it
    on a random float32 input against the reference for each known weight offset: whatever its class is called."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, (int, float)):
        return None
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, weight.numel(), generator=generator) * 3).to(weight.device)
    with torch.no_grad():
        got = module(probe).float()
        for offset in NORM_WEIGHT_OFFSETS:
            expected, _ = add_rms_norm_ref(probe, None, weight, float(eps), offset)
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
                return RmsNorm(weight, float(eps), offset)
    return None


def norm_or_reason(module: nn.Module | None, where: str) -> tuple[RmsNorm | None, str | None]:
    """(the module's RMSNorm form, None), or (None, why not) naming `where` (e.g. "layer 3's input norm")."""
    form = None if module is None else rms_norm_form(module)
    if form is None:
        return None, f"{where} ({type(module).__name__}) is not an RMSNorm of weight and eps"
    return form, None


def gated_mlp_activation(mlp: nn.Module, hidden_size: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[nn.Module | None, str | None]:
    """(activation, None) when mlp(x) is down(act(gate(x)) * up(x)): activation None means SiLU (the fused
    silu_mul), else the module's own act_fn (another elementwise activation, e.g. Gemma's tanh GELU, run as is).
    (None, why not) otherwise."""
    if not all(hasattr(mlp, name) for name in MLP_PARTS):
        return None, f"its MLP ({type(mlp).__name__}) is not gate_proj/up_proj/down_proj with act_fn"
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, hidden_size, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        expected = mlp(probe).float()
        composed = mlp.down_proj(mlp.act_fn(mlp.gate_proj(probe)) * mlp.up_proj(probe)).float()
        if (composed - expected).norm() > 1e-3 * expected.norm():
            return None, f"its MLP ({type(mlp).__name__}) computes something else than down(act(gate) * up)"
        grid = torch.linspace(-8, 8, 257)
        is_silu = torch.allclose(mlp.act_fn(grid.to(device)).float().cpu(), nn.functional.silu(grid), atol=1e-6)
    return (None if is_silu else mlp.act_fn), None
