"""One lazy block of a GPTQ pass as one kernel (gptq_block_ref.solve_row_block_ref is its contract and reference):
a program holds a [rows, BLOCK_M] tile of the block in registers and walks its rows in order, so a 32-row block
costs one launch instead of a handful of small ops per row. Every column is independent inside a block (the
feedback mixes rows, never columns), so the programs need nothing from each other. What the EXL2 measurement pass
runs for its candidates side by side (quant/exl2_solver.candidate_errors)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from qtool.kernels.engine_ops_triton import _round_half_even
from qtool.kernels.gptq_block_ref import solve_row_block_ref
from qtool.kernels.profiled_range import ROW_BLOCK_RANGE, profiled_range
from qtool.kernels.registry import triton_device_problem

BLOCK_M = 128
MAX_ROWS = 64  # a block's rows held in registers per program


@triton.jit
def _row_block_kernel(w_ptr, divisor_ptr, scale_ptr, zero_ptr, low_ptr, high_ptr, upper_ptr, dq_ptr, err_ptr, codes_ptr,
                      rows, columns, w_sr, u_sr, dq_sr, e_sr, c_sr, g_sr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                      PER_ROW: tl.constexpr):
    """Program over columns [pid * BLOCK_M, ...): the block's rows in order, as solve_row_block_ref (the feedback
    kept in the register tile; w itself is not written back: the caller reads the block only through dq and err).
    PER_ROW: divisor, scale and zero are [rows, columns] (row stride g_sr), read for each row in turn."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cols < columns
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rows
    tile = tl.load(w_ptr + r[:, None] * w_sr + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    divisor = tl.load(divisor_ptr + cols, mask=c_ok, other=1.0)
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)
    zero = tl.load(zero_ptr + cols, mask=c_ok, other=0.0)
    low = tl.load(low_ptr + cols, mask=c_ok, other=0.0)
    high = tl.load(high_ptr + cols, mask=c_ok, other=0.0)
    for i in range(rows):
        if PER_ROW:
            divisor = tl.load(divisor_ptr + i * g_sr + cols, mask=c_ok, other=1.0)
            scale = tl.load(scale_ptr + i * g_sr + cols, mask=c_ok, other=0.0)
            zero = tl.load(zero_ptr + i * g_sr + cols, mask=c_ok, other=0.0)
        row = tl.sum(tl.where(r[:, None] == i, tile, 0.0), axis=0)
        codes = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(row, divisor)) + zero, low), high)
        dequantized = scale * (codes - zero)
        error = tl.math.div_rn(row - dequantized, tl.load(upper_ptr + i * u_sr + i))
        tl.store(codes_ptr + i * c_sr + cols, codes, mask=c_ok)
        tl.store(dq_ptr + i * dq_sr + cols, dequantized, mask=c_ok)
        tl.store(err_ptr + i * e_sr + cols, error, mask=c_ok)
        feedback = tl.load(upper_ptr + i * u_sr + r, mask=r_ok & (r > i), other=0.0)
        tile = tile - feedback[:, None] * error[None, :]


def triton_interpreted() -> bool:
    """True when this kernel was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_row_block_kernel, JITFunction)


def blocks_problem(w: torch.Tensor) -> str | None:
    """Why solve_rows cannot put the rows of w (any number: it cuts them into blocks of MAX_ROWS) through the kernel,
    for their device or dtype (the reference then runs), or None. What a solver asks before taking its block path."""
    if not w.is_cuda:
        return f"the rows are on {w.device.type} (the kernel serves CUDA tensors)"
    problem = triton_device_problem(w.device, triton_interpreted())
    if problem:
        return problem
    if w.dtype != torch.float32:
        return f"{w.dtype} rows (the kernel: float32)"
    return None


def row_block_problem(w: torch.Tensor) -> str | None:
    """Why the kernel does not take this one block (the reference then runs), or None."""
    problem = blocks_problem(w)
    if problem is None and w.shape[0] > MAX_ROWS:
        problem = f"a block of {w.shape[0]} rows (the kernel: up to {MAX_ROWS}; solve_rows cuts longer ones)"
    return problem


def solve_row_block_triton(w: torch.Tensor, divisor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           low: torch.Tensor, high: torch.Tensor,
                           upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """solve_row_block_ref in one launch (w is read, not updated: its rows after the first are the caller's to
    drop, as the reference's updates are)."""
    rows, columns = w.shape
    w, upper = (t if t.stride(-1) == 1 else t.contiguous() for t in (w, upper))
    divisor, scale, zero, low, high = (t.contiguous() for t in (divisor, scale, zero, low, high))
    per_row = divisor.dim() == 2
    if per_row and not (divisor.shape == scale.shape == zero.shape == (rows, columns)):
        raise ValueError(f"a grid per row must be [{rows}, {columns}] for divisor, scale and zero")
    dequantized = torch.empty(rows, columns, dtype=torch.float32, device=w.device)
    errors, codes = torch.empty_like(dequantized), torch.empty_like(dequantized)
    if rows and columns:
        _row_block_kernel[(triton.cdiv(columns, BLOCK_M),)](
            w, divisor, scale, zero, low, high, upper, dequantized, errors, codes, rows, columns, w.stride(0),
            upper.stride(0), dequantized.stride(0), errors.stride(0), codes.stride(0), columns if per_row else 0,
            BLOCK_R=max(triton.next_power_of_2(rows), 16), BLOCK_M=BLOCK_M, PER_ROW=per_row, num_warps=4)
    return dequantized, errors, codes


def solve_row_block(w: torch.Tensor, divisor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
                    high: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """solve_row_block_ref's contract: the kernel on a CUDA tensor it takes, the reference elsewhere (w may or may
    not be updated in place: callers use only the returned rows)."""
    with profiled_range(ROW_BLOCK_RANGE):
        if row_block_problem(w) is None:
            return solve_row_block_triton(w, divisor, scale, zero, low, high, upper)
        return solve_row_block_ref(w, divisor, scale, zero, low, high, upper)


solve_row_block.__doc__ = solve_row_block_ref.__doc__ + "\n\n" + (solve_row_block.__doc__ or "")


def solve_rows(w: torch.Tensor, divisor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
               high: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """solve_row_block's contract for any number of rows, on one grid or a grid per row ([R, M] divisor, scale and
    zero): sub-blocks of up to MAX_ROWS through it, each sub-block's errors fed to the rows after it in one matmul
    (those rows of w are updated in place)."""
    rows = w.shape[0]
    outputs = tuple(torch.empty(w.shape, dtype=torch.float32, device=w.device) for _ in range(3))
    per_row = divisor.dim() == 2
    for start in range(0, rows, MAX_ROWS):
        end = min(start + MAX_ROWS, rows)
        grid = (divisor[start:end], scale[start:end], zero[start:end]) if per_row else (divisor, scale, zero)
        parts = solve_row_block(w[start:end], *grid, low, high, upper[start:end, start:end])
        for out, part in zip(outputs, parts):
            out[start:end] = part
        if end < rows:
            w[end:].addmm_(upper[start:end, end:].T, parts[1], alpha=-1.0)
    return outputs
