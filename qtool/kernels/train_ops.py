"""The fine-tuning step's fused operations as autograd functions: residual add + RMSNorm, SiLU(gate) * up, RoPE,
and the head's linear + cross entropy over row chunks. Each forward and backward runs its Triton kernel on a CUDA
tensor of a GPU the kernels serve (the choice engine_ops makes), else its torch reference (train_ops_ref.py): the
same numbers on the CPU, in tests and for CPU users."""

from __future__ import annotations

from typing import Any

import torch

from qtool.kernels.engine_ops import add_rms_norm as add_rms_norm_forward
from qtool.kernels.engine_ops import silu_mul as silu_mul_forward
from qtool.kernels.engine_ops import triton_problem
from qtool.kernels.profiled_range import LOSS_RANGE, profiled_range
from qtool.kernels.train_ops_ref import (rms_norm_backward_ref, rms_norm_weight_grad_ref, rope_backward_ref, rope_ref,
                                        silu_mul_backward_ref)

# the logits of one chunk of rows in float32 stay under this many values (128 MiB): a 2048-token row of a
# 32k vocabulary never holds its whole [tokens, vocab] float32 logits, nor their gradient
CROSS_ENTROPY_CHUNK_VALUES = 1 << 25


def _rms_norm_backward(*args: Any) -> torch.Tensor:
    if triton_problem(args[2]) is None:
        from qtool.kernels.train_ops_triton import rms_norm_backward_triton

        return rms_norm_backward_triton(*args)
    return rms_norm_backward_ref(*args)


class _AddRmsNorm(torch.autograd.Function):
    """(normed, summed) of engine_ops.add_rms_norm; residual None: summed is x and only normed is returned."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                weight_offset: float) -> Any:
        normed, summed = add_rms_norm_forward(x, residual, weight, eps, weight_offset)
        ctx.save_for_backward(summed, weight)
        ctx.eps, ctx.weight_offset, ctx.has_residual = eps, weight_offset, residual is not None
        return (normed, summed) if residual is not None else normed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_normed: torch.Tensor | None, grad_summed: torch.Tensor | None = None) -> tuple:
        summed, weight = ctx.saved_tensors
        if grad_normed is None:
            grad_normed = torch.zeros_like(summed)
        grad_x = _rms_norm_backward(grad_normed, grad_summed, summed, weight, ctx.eps, ctx.weight_offset)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = rms_norm_weight_grad_ref(grad_normed, summed, ctx.eps).to(weight.dtype)
        return grad_x, (grad_x if ctx.has_residual else None), grad_weight, None, None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * (weight + weight_offset), x + residual), differentiable in x, residual and weight."""
    return _AddRmsNorm.apply(x, residual, weight, float(eps), float(weight_offset))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm(x) * (weight + weight_offset) over the last dim, differentiable in x and weight."""
    return _AddRmsNorm.apply(x, None, weight, float(eps), float(weight_offset))


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return silu_mul_forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        if triton_problem(gate) is None:
            from qtool.kernels.train_ops_triton import silu_mul_backward_triton

            return silu_mul_backward_triton(grad, gate, up)
        return silu_mul_backward_ref(grad, gate, up)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, differentiable in both."""
    return _SiluMul.apply(gate, up)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if triton_problem(x) is None:
        from qtool.kernels.train_ops_triton import rope_triton

        return rope_triton(x, cos, sin, backward)
    return (rope_backward_ref if backward else rope_ref)(x, cos, sin)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] turned by rotate-half RoPE with cos/sin [T, d] (train_ops_ref.rope_ref), differentiable in
    x (the tables are constants)."""
    return _Rope.apply(x, cos, sin)


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed next-token loss of hidden @ weight^T against labels, with its gradients formed in the forward a
    chunk of rows at a time (the logits of one chunk exist at once, never all of them)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk_rows: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows]
            targets = labels[start : start + chunk_rows]
            counted = targets != ignore_index
            safe = targets.masked_fill(~counted, 0).unsqueeze(1)
            logits = torch.matmul(rows, weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe).squeeze(1)) * counted).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # softmax - one-hot in place over the chunk's logits; rows without a label give nothing
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs.scatter_add_(1, safe, -torch.ones_like(safe, dtype=probs.dtype))
            probs.mul_(counted.unsqueeze(1))
            grad_logits = probs.to(rows.dtype)
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[start : start + chunk_rows])
            if grad_weight is not None:
                grad_weight.add_(torch.matmul(grad_logits.T, rows).float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """sum over rows with a label of cross_entropy(hidden @ weight^T, label) in float32 (hidden [N, H], weight
    [V, H], labels [N]; rows labelled ignore_index count nothing), differentiable in hidden and weight. Under
    autocast the matmuls run in its dtype, as a linear's would. chunk_rows: rows per chunk (default: as many as
    keep a chunk's float32 logits within CROSS_ENTROPY_CHUNK_VALUES)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    chunk_rows = chunk_rows or max(1, CROSS_ENTROPY_CHUNK_VALUES // max(1, weight.shape[0]))
    with torch.autocast(device_type, enabled=False), profiled_range(LOSS_RANGE):
        return _LinearCrossEntropy.apply(hidden, weight, labels, int(ignore_index), chunk_rows)


def train_kernels_problem(device: torch.device) -> str | None:
    """None when the fused operations' Triton kernels build on `device` and agree with their references on a small
    random case (each direction of each kernel, bfloat16), else why not: a caller then keeps transformers' forward
    instead of failing inside a user's first step. Off CUDA the references run, and there is nothing to check."""
    probe = torch.empty(0, device=device)
    if triton_problem(probe) is not None:
        return None
    from qtool.kernels.train_ops_triton import rms_norm_backward_triton, rope_triton, silu_mul_backward_triton

    gen = torch.Generator().manual_seed(0)
    x, grad, other = (torch.randn(3, 2, 8, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    cos, sin = (torch.rand(3, 8, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    weight = x[0, 0]
    try:
        checks = (
            (rms_norm_backward_triton(grad, other, x, weight, 1e-5), rms_norm_backward_ref(grad, other, x, weight, 1e-5)),
            *zip(silu_mul_backward_triton(grad, x, other), silu_mul_backward_ref(grad, x, other)),
            (rope_triton(x, cos, sin), rope_ref(x, cos, sin)),
            (rope_triton(x, cos, sin, backward=True), rope_backward_ref(x, cos, sin)),
        )
    except Exception as exc:  # a compiler or driver refusal: said in one line, training goes on unfused
        return f"the fused training kernels do not build here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    for got, expected in checks:
        if not torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2):
            return "the fused training kernels disagree with their references on this GPU"
    return None
