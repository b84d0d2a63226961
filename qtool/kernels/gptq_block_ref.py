"""Torch reference of one lazy block of a GPTQ pass (gptq_block_triton.py runs it as one kernel on the GPU): the
rows of the block quantized one after another on a per-column grid, each row's error fed back to the rows after it
inside the block. The rows after the block take the block's errors in one matmul, the caller's."""

from __future__ import annotations

import torch


def solve_row_block_ref(w: torch.Tensor, divisor: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                        high: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over the rows w [R, M] (float32, updated in place) of one block: row i's codes round(w[i] / divisor)
    (halves to even) clamped to [low, high], its dequantized row codes * scale, its error (w[i] - dequantized) /
    upper[i, i], and rows j > i of the block lowered by upper[i, j] * error. divisor, scale, low, high: [M] float32
    per column; upper [R, R]: the block's part of the upper Cholesky factor of the inverse Hessian. Returns
    (dequantized [R, M], errors [R, M])."""
    rows = w.shape[0]
    dequantized = torch.empty_like(w)
    errors = torch.empty_like(w)
    codes = torch.empty_like(scale)
    diagonal = upper.diagonal().tolist()
    for i in range(rows):
        torch.div(w[i], divisor, out=codes).round_().clamp_(low, high)
        torch.mul(codes, scale, out=dequantized[i])
        error = torch.sub(w[i], dequantized[i], out=errors[i]).div_(diagonal[i])
        if i + 1 < rows:
            w[i + 1 :].addr_(upper[i, i + 1 :], error, alpha=-1.0)
    return dequantized, errors
