"""Torch references of the fine-tuning step's fused elementwise operations, forward and backward: residual add +
RMSNorm, SiLU(gate) * up, and rotate-half RoPE over [tokens, heads, head_dim] rows. Each forward is the engine's
(engine_ops_ref) or computes in float32 and rounds once; each backward is the exact gradient of that float32
computation, rounded once to the input's dtype. train_ops_triton.py holds the kernels, train_ops.py the autograd
functions that route between the two."""

from __future__ import annotations

import torch

from qtool.kernels.engine_ops_ref import _rope_rows


def rms_norm_backward_ref(grad_normed: torch.Tensor, grad_summed: torch.Tensor | None, summed: torch.Tensor,
                          weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """The gradient reaching summed (= x + residual, engine_ops_ref.add_rms_norm_ref's second output) from both
    outputs: through normed = RMSNorm(summed) * (weight + offset), and grad_summed where summed itself is used
    again (the residual stream; None: not used). x and residual both receive it. In float32, rounded to summed's
    dtype: with h = summed, r = rsqrt(mean(h^2) + eps), g = grad_normed * (w + offset):
    dh = r * g - h * r^3 * mean(g * h)."""
    h = summed.float()
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    g = grad_normed.float() * (weight.float() + weight_offset)
    dh = rstd * g - h * rstd.pow(3) * (g * h).mean(dim=-1, keepdim=True)
    if grad_summed is not None:
        dh = dh + grad_summed.float()
    return dh.to(summed.dtype)


def rms_norm_weight_grad_ref(grad_normed: torch.Tensor, summed: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm weight's gradient (full fine-tuning trains it): the sum over rows of grad_normed * RMSNorm(summed),
    in float32."""
    h = summed.float()
    normalized = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (grad_normed.float() * normalized).reshape(-1, h.shape[-1]).sum(dim=0)


def silu_mul_backward_ref(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of silu(gate) * up (engine_ops_ref.silu_mul_ref), in float32, rounded to the inputs' dtypes:
    d up = grad * silu(gate), d gate = grad * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate)."""
    g, u, dy = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    return (dy * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy * g * s).to(up.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] turned by rotate-half RoPE with cos/sin [T, d], in float32, rounded to x's dtype (the
    engine's rotation): y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 over the halves of d."""
    return _rope_rows(x, cos, sin)


def rope_backward_ref(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of rope_ref's input: the transposed rotation, dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1, in
    float32, rounded to grad's dtype."""
    half = grad.shape[-1] // 2
    g = grad.float()
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    g1, g2 = g[..., :half], g[..., half:]
    dx1 = g1 * c[..., :half] + g2 * s[..., half:]
    dx2 = g2 * c[..., half:] - g1 * s[..., :half]
    return torch.cat((dx1, dx2), dim=-1).to(grad.dtype)
