"""A GPTQ linear on the dequant backend plus a low-rank term, y = x @ W^T + bias + scaling * (x @ A^T) @ B^T, as one
autograd function (what a LoRA layer over a quantized base computes): the low-rank product is added into the base
matmul's output in place (one read and write of y) instead of as three more [M, N] tensors (B's output, its scaled
copy, the sum), and in the backward dX = dY @ W + (scaling * dY @ B) @ A is formed in one buffer the same way.
Only x, A and B get gradients; the packed weight is frozen."""

from __future__ import annotations

from typing import Any

import torch

from qtool.kernels.gptq_dequant_triton import DEQUANT_DTYPES
from qtool.kernels.linear_tensors import check_input_features

DEQUANT_BACKEND = "dequant"


class DequantLowRankFunction(torch.autograd.Function):
    """Arguments x [..., K], a [r, K], b [N, r] (x's dtype), scaling (a float), layer, backend (no gradients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, layer: Any,
                backend: Any) -> torch.Tensor:
        form = layer.prepared_form(backend)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, form.in_features)
        xa = torch.matmul(x2, a.T)  # [M, r]
        with backend.scratch.weight_t(form, x.dtype) as w_t:
            y = torch.matmul(x2, w_t) if form.bias is None else torch.addmm(form.bias.to(x.dtype), x2, w_t)
        y.addmm_(xa, b.T, alpha=scaling)
        ctx.save_for_backward(x, a, b, xa)
        ctx.scaling, ctx.form, ctx.backend = scaling, form, backend  # the form aliases the layer's buffers
        return y.reshape(*lead, form.out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        x, a, b, xa = ctx.saved_tensors
        x2 = x.reshape(-1, a.shape[1])
        dy = grad_output.reshape(-1, b.shape[0]).to(x.dtype)
        s = ctx.scaling
        # the scaling rides in the GEMMs' alpha (no separate scaling pass): dL/d(x @ A^T) = s * dY @ B, kept unscaled
        dxa = torch.matmul(dy, b)  # [M, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = _scaled_matmul(dy.T, xa, s)
        if ctx.needs_input_grad[1]:
            grad_a = _scaled_matmul(dxa.T, x2, s)
        if ctx.needs_input_grad[0]:
            with ctx.backend.scratch.weight_t(ctx.form, dy.dtype) as w_t:
                dx = torch.matmul(dy, w_t.T)
            grad_x = dx.addmm_(dxa, a, alpha=s).reshape(x.shape)
        return grad_x, grad_a, grad_b, None, None, None


def _scaled_matmul(m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * m1 @ m2 in one GEMM: addmm with beta 0 ignores its input (an uninitialized scalar, no kernel)."""
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=alpha)


def dequant_linear_plus_low_rank(layer: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                 scaling: float) -> torch.Tensor | None:
    """layer(x) + scaling * (x @ a^T) @ b^T through DequantLowRankFunction, or None where it does not apply: the
    layer's route for x is not the dequant backend, the dtypes differ (x, a, b must share one the dequantize kernel
    writes) or autocast is on in another dtype (it would recast inside the function); the caller then computes the
    two terms apart. Under autocast in x's dtype, pass a and b cast to it (as autocast casts a linear's weight)."""
    check_input_features(x, layer.in_features, layer.linear_label)
    backend = layer.route(x)
    if backend.name != DEQUANT_BACKEND or x.dtype not in DEQUANT_DTYPES or not (x.dtype == a.dtype == b.dtype):
        return None
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != x.dtype:
        return None
    return DequantLowRankFunction.apply(x, a, b, float(scaling), layer, backend)
