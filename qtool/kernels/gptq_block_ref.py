"""Torch reference of one lazy block of a GPTQ pass (gptq_block_triton.py runs it as one kernel on the GPU): the
rows of the block quantized one after another on a per-column grid, each row's error fed back to the rows after it
inside the block. The rows after the block take the block's errors in one matmul, the caller's."""

from __future__ import annotations

import torch


def solve_row_block_ref(w: torch.Tensor, divisor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        low: torch.Tensor, high: torch.Tensor,
                        upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ over the rows w [R, M] (float32, updated in place) of one block: row i's codes round(w[i] / divisor)
    (halves to even) + zero clamped to [low, high], its dequantized row scale * (codes - zero), its error (w[i] -
    dequantized) / upper[i, i], and rows j > i of the block lowered by upper[i, j] * error. divisor, scale, zero,
    low, high: [M] float32 per column (GPTQ: divisor = scale, its zero point, [0, maxq]; EXL2: zero 0, [-z, z - 1]);
    divisor, scale and zero may instead be [R, M], a grid per row (GPTQ's static groups under act order: each row
    of the block is a weight column of its own group). upper [R, R]: the block's part of the upper Cholesky factor
    of the inverse Hessian. Returns (dequantized [R, M], errors [R, M], codes [R, M] float32)."""
    rows = w.shape[0]
    dequantized = torch.empty_like(w)
    errors = torch.empty_like(w)
    codes = torch.empty_like(w)
    diagonal = upper.diagonal().tolist()
    per_row = divisor.dim() == 2
    for i in range(rows):
        d, s, z = (divisor[i], scale[i], zero[i]) if per_row else (divisor, scale, zero)
        torch.div(w[i], d, out=codes[i]).round_().add_(z).clamp_(low, high)
        torch.mul(s, codes[i] - z, out=dequantized[i])
        error = torch.sub(w[i], dequantized[i], out=errors[i]).div_(diagonal[i])
        if i + 1 < rows:
            w[i + 1 :].addr_(upper[i, i + 1 :], error, alpha=-1.0)
    return dequantized, errors, codes
