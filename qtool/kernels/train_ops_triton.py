"""Triton kernels of the fine-tuning step's fused elementwise operations (train_ops_ref.py holds their torch
references and semantics): the backward of residual add + RMSNorm (the forward is the engine's add_rms_norm
kernel), the backward of SiLU(gate) * up (the forward is the engine's silu_mul kernel), and rotate-half RoPE over
[tokens, heads, head_dim] rows, forward and backward in one kernel. Each reads its inputs once and writes its
outputs once, in float32 inside: one launch where transformers' eager modules take five to ten."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.core.errors import QtoolError
from qtool.kernels.engine_ops_triton import _cast, _pow2, _rows


@triton.jit
def _rms_norm_backward_kernel(dn_ptr, ds_ptr, s_ptr, w_ptr, dx_ptr, dn_s, ds_s, s_s, dx_s, hidden, eps, offset,
                              HAS_GRAD_SUMMED: tl.constexpr, BLOCK: tl.constexpr):
    """One row: dx = r * g - h * r^3 * mean(g * h) (+ grad_summed), g = grad_normed * (w + offset)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    h = tl.load(s_ptr + row * s_s + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(dn_ptr + row * dn_s + cols, mask=ok, other=0.0).to(tl.float32) * (w + offset)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden + eps)
    dh = rstd * g - h * (rstd * rstd * rstd) * (tl.sum(g * h, axis=0) / hidden)
    if HAS_GRAD_SUMMED:
        dh += tl.load(ds_ptr + row * ds_s + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * dx_s + cols, _cast(dh, dx_ptr.dtype.element_ty), mask=ok)


def rms_norm_backward_triton(grad_normed: torch.Tensor, grad_summed: torch.Tensor | None, summed: torch.Tensor,
                             weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """train_ops_ref.rms_norm_backward_ref on the GPU: one program per row."""
    hidden = summed.shape[-1]
    if (grad_normed.shape != summed.shape or weight.shape != (hidden,)
            or (grad_summed is not None and grad_summed.shape != summed.shape)):
        raise QtoolError(f"rms_norm_backward: grad {tuple(grad_normed.shape)}, summed {tuple(summed.shape)}, weight "
                         f"{tuple(weight.shape)} (grads the shape of summed, weight [hidden])")
    s2, dn2 = _rows(summed, hidden), _rows(grad_normed, hidden)
    ds2 = dn2 if grad_summed is None else _rows(grad_summed, hidden)
    out = torch.empty(summed.shape, dtype=summed.dtype, device=summed.device)
    dx2 = out.view(-1, hidden)
    if dx2.shape[0] == 0:
        return out
    block = _pow2(hidden)
    _rms_norm_backward_kernel[(dx2.shape[0],)](
        dn2, ds2, s2, weight, dx2, dn2.stride(0), ds2.stride(0), s2.stride(0), dx2.stride(0), hidden, float(eps),
        float(weight_offset), HAS_GRAD_SUMMED=grad_summed is not None, BLOCK=block,
        num_warps=min(max(block // 512, 1), 16))
    return out


@triton.jit
def _silu_mul_backward_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, dy_s, g_s, u_s, dg_s, du_s, width,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    dy = tl.load(dy_ptr + row * dy_s + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_s + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_s + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + row * dg_s + cols, _cast(dy * u * s * (1.0 + g * (1.0 - s)), dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + row * du_s + cols, _cast(dy * g * s, du_ptr.dtype.element_ty), mask=ok)


def silu_mul_backward_triton(grad: torch.Tensor, gate: torch.Tensor,
                             up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """train_ops_ref.silu_mul_backward_ref on the GPU, one program per (row, BLOCK columns)."""
    if not grad.shape == gate.shape == up.shape:
        raise QtoolError(f"silu_mul_backward: grad {tuple(grad.shape)}, gate {tuple(gate.shape)} and up "
                         f"{tuple(up.shape)} must be one shape")
    width = gate.shape[-1] if gate.dim() else 1
    dy2, g2, u2 = _rows(grad, width), _rows(gate, width), _rows(up, width)
    d_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    dg2, du2 = d_gate.view(-1, width), d_up.view(-1, width)
    if dg2.numel() == 0:
        return d_gate, d_up
    block = min(_pow2(width), 1024)
    _silu_mul_backward_kernel[(dg2.shape[0], triton.cdiv(width, block))](
        dy2, g2, u2, dg2, du2, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), width,
        BLOCK=block, num_warps=4)
    return d_gate, d_up


@triton.jit
def _rope_kernel(x_ptr, o_ptr, cos_ptr, sin_ptr, x_st, x_sh, o_st, o_sh, c_st, s_st, heads,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """Program (token, BLOCK_H heads): the forward rotation y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2, or its
    transpose (BACKWARD) dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    ok = (h[:, None] < heads) & (d[None, :] < HALF)
    d_ok = d < HALF
    cos1 = tl.load(cos_ptr + t * c_st + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + t * c_st + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + t * s_st + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + t * s_st + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    src = x_ptr + t * x_st + h[:, None] * x_sh + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    dst = o_ptr + t * o_st + h[:, None] * o_sh + d[None, :]
    tl.store(dst, _cast(y1, o_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, _cast(y2, o_ptr.dtype.element_ty), mask=ok)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """train_ops_ref.rope_ref (or, backward, rope_backward_ref) on the GPU: x [T, heads, d] (a strided view of a
    projection's output is read as it is, unit last stride), cos/sin [T, d]; a new contiguous output."""
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or cos.shape != (tokens, head_dim) or sin.shape != cos.shape:
        raise QtoolError(f"rope: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} (x [T, heads, d] "
                         "with d even, cos/sin [T, d])")
    x, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, cos, sin))
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = head_dim // 2
    block_half = _pow2(half)
    block_h = min(_pow2(heads), max(1, 2048 // block_half))
    _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
        x, out, cos, sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),
        heads, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=4)
    return out
