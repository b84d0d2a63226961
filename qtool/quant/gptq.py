"""The GPTQ solver for one linear layer (Frantar et al. 2022, with the act-order, static-group and damping
refinements of GPTQModel): quantize W column by column, feeding each column's error back into the columns not
yet quantized through the Cholesky factor of the inverse Hessian."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from qtool.core.errors import QtoolError
from qtool.kernels.gptq_block_triton import blocks_problem, solve_rows
from qtool.quant.grid import (check_grid_options, dequantize_codes, fit_grid, fit_group_grids, max_code, natural_g_idx,
                              round_to_grid)
from qtool.formats.quantized_weight import QuantizedWeight, codes_dtype

log = logging.getLogger(__name__)

# Below torch's parallel grain (32768 elements) an elementwise op runs on the calling thread.
_SERIAL_ELEMENTS = 32768


@dataclass
class GPTQResult:
    """What a solver returns for one weight [out_features, in_features]."""

    quantized: QuantizedWeight
    dequantized: torch.Tensor  # float32 [out, in], equal bit for bit to quantized.dequantize()
    # GPTQ: 1/2 * sum over columns of (w - q)^2 / [H^-1]_ii (as GPTQModel sums its losses, before it divides by
    # the sample count), which equals 1/2 * tr((W - Q) H_damped (W - Q)^T). RTN: sum of squared weight errors.
    error: float
    damp_percent: float  # the damping that made the Hessian invertible (0 for RTN)
    seconds: float


FINITE_CHECK_ROWS = 1024  # rows checked at a time: no full-size temporaries beside a 7B's [11008, 11008] H


def all_finite(matrix: torch.Tensor) -> bool:
    """Whether every entry is finite, checked a slice of rows at a time."""
    return all(bool(torch.isfinite(rows).all()) for rows in matrix.split(FINITE_CHECK_ROWS))


def inverse_hessian_cholesky(
    hessian: torch.Tensor, damp_percent: float, damp_auto_increment: float
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so H^-1 = U^T U) and the damp used.

    When a factorization fails the damp is raised by damp_auto_increment and tried again, while it stays below 1."""
    mean_diag = hessian.diagonal().mean()
    attempt = 0
    while True:
        damp = damp_percent + attempt * damp_auto_increment
        # With J the index reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper
        # with a positive diagonal, hence the factor wanted: one Cholesky and one triangular solve, no inverse.
        damped = hessian.flip(0, 1)
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            # The damped copy's memory becomes the identity that the triangular solve overwrites with L^-1, and
            # L goes before the flip: at most four [k, k] matrices live at once, counting the caller's H and its
            # working copy (a 7B's down_proj: 0.45 GiB each).
            inverse = damped.zero_()
            del damped
            inverse.diagonal().fill_(1.0)
            torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
            del lower
            upper = inverse.flip(0, 1)
            del inverse
            if all_finite(upper):
                return upper, damp
        next_damp = damp_percent + (attempt + 1) * damp_auto_increment
        if damp_auto_increment <= 0 or next_damp >= 1.0:
            raise QtoolError(
                f"the Hessian is not positive definite even with damp_percent={damp:.4f}",
                "calibrate on more (or more varied) tokens, raise damp_percent / damp_auto_increment, or use method rtn",
            )
        log.info("Hessian Cholesky failed at damp_percent=%.4f; retrying with %.4f", damp, next_damp)
        attempt += 1


def _check_options(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, min_zero: int,
                   damp_percent: float, damp_auto_increment: float, block_size: int) -> None:
    check_grid_options(weight, bits, group_size, min_zero)
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise QtoolError(f"Hessian has shape {tuple(hessian.shape)}, the weight has {k} input features", f"pass a [{k}, {k}] Hessian of this linear's inputs")
    if not 0 <= damp_percent < 1:
        raise QtoolError(f"damp_percent={damp_percent} is out of range", "use a value in [0, 1), e.g. 0.01")
    if not 0 <= damp_auto_increment < 1:
        raise QtoolError(f"damp_auto_increment={damp_auto_increment} is out of range", "use a value in [0, 1), e.g. 0.0025")
    if block_size < 1:
        raise QtoolError(f"block_size={block_size} is not valid", "use a positive integer, e.g. 128")
    if not all_finite(hessian):
        raise QtoolError("the Hessian holds NaN or infinite values", "check the calibration activations of this linear")


def _solve_columns(
    work: torch.Tensor,
    upper: torch.Tensor,
    bounds: list[int],
    block_grid: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]],
    bits: int,
    kernel_blocks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over the rows of work = W^T [K, N] (updated in place), with blocks [bounds[i], bounds[i+1])
    and upper = the Cholesky factor of H^-1. block_grid(work, start, end) gives the block's (scale, zero): [N] each for
    one grid over the whole block (bounds split at group starts), or [end - start, N] for a grid per column (static
    groups under act order). Returns codes [K, N] (codes_dtype(bits)), dequantized [K, N] and the sum of squared
    scaled errors.
    kernel_blocks: each block goes through solve_rows (one kernel per 64 columns on a GPU, where the column loop is
    a handful of small launches per column)."""
    cols, rows = work.shape
    codes_t = torch.empty(work.shape, dtype=codes_dtype(bits), device=work.device)  # (float codes are integral)
    deq_t = torch.empty_like(work)
    loss = torch.zeros((), dtype=torch.float32, device=work.device)
    if kernel_blocks:
        low = torch.zeros(rows, dtype=torch.float32, device=work.device)
        high = torch.full_like(low, max_code(bits))
    # Inside a block, rank-1 updates reach only the next few columns (a sub-block small enough that torch runs
    # them on the calling thread: per-column parallel regions stall when the cores are shared); each sub-block
    # then updates the rest of its block with one matmul, and each block the columns after it.
    sub_width = max(1, min(16, _SERIAL_ELEMENTS // max(rows, 1)))
    for start, end in zip(bounds[:-1], bounds[1:]):
        scale, zero = block_grid(work, start, end)
        if kernel_blocks:
            deq_t[start:end], block_err, codes_t[start:end] = solve_rows(
                work[start:end], scale, scale, zero, low, high, upper[start:end, start:end])
        else:
            block_err = _solve_block_columns(work, upper, start, end, sub_width, scale, zero, bits, codes_t, deq_t)
        if end < cols:
            work[end:].addmm_(upper[start:end, end:].T, block_err, alpha=-1.0)
        loss += block_err.square().sum()
    return codes_t, deq_t, loss


def _solve_block_columns(work: torch.Tensor, upper: torch.Tensor, start: int, end: int, sub_width: int,
                         scale: torch.Tensor, zero: torch.Tensor, bits: int, codes_t: torch.Tensor,
                         deq_t: torch.Tensor) -> torch.Tensor:
    """One block's columns one at a time (into codes_t, deq_t) on the block's grid ([N], or [end - start, N] per
    column), sub-blocks of sub_width updating the rest of the block with one matmul each; the block's scaled
    errors [end - start, rows]."""
    per_column = scale.dim() == 2
    block_err = torch.empty(end - start, work.shape[1], dtype=torch.float32, device=work.device)
    for sub_start in range(start, end, sub_width):
        sub_end = min(sub_start + sub_width, end)
        for pos in range(sub_start, sub_end):
            column_scale, column_zero = (scale[pos - start], zero[pos - start]) if per_column else (scale, zero)
            column = work[pos]
            codes = round_to_grid(column, column_scale, column_zero, bits)
            deq = dequantize_codes(codes, column_scale, column_zero)
            codes_t[pos] = codes
            deq_t[pos] = deq
            err = (column - deq) / upper[pos, pos]
            block_err[pos - start] = err
            work[pos + 1 : sub_end].addr_(upper[pos, pos + 1 : sub_end], err, alpha=-1.0)
        if sub_end < end:
            sub_err = block_err[sub_start - start : sub_end - start]
            work[sub_end:end].addmm_(upper[sub_start:sub_end, sub_end:end].T, sub_err, alpha=-1.0)
    return block_err


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    damp_auto_increment: float = 0.0025,
    mse: bool = False,
    min_zero: int = 0,
    block_size: int = 128,
) -> GPTQResult:
    """GPTQ-quantize weight [N, K] given the Hessian [K, K] of its inputs (neither is modified).

    Groups are fitted when the solver reaches their first column, from the weights as updated by every column
    quantized before (exactly, whatever block_size: blocks are split at group starts). desc_act quantizes the
    columns by descending Hessian diagonal, and its groups are consecutive in that order unless static_groups,
    where groups are fitted up front on the original weight in natural order. Runs on weight's device."""
    started = time.perf_counter()
    _check_options(weight, hessian, bits, group_size, min_zero, damp_percent, damp_auto_increment, block_size)
    device = weight.device
    rows, cols = weight.shape
    width = cols if group_size == -1 else group_size
    num_groups = math.ceil(cols / width)

    source = hessian.detach().to(device=device, dtype=torch.float32)
    dead = source.diagonal() == 0
    if bool(dead.all()):
        raise QtoolError("the Hessian is all zero: no calibration token reached this linear", "check the calibration data, or use method rtn")
    # An input that is always 0 leaves its weight free: GPTQ zeroes it and gives H a unit pivot there. The working
    # copy of H is made in one gather under act order (no intermediate [k, k] copy).
    if desc_act:
        pivots = torch.where(dead, torch.ones_like(source.diagonal()), source.diagonal())
        perm = torch.argsort(pivots, descending=True, stable=True)
        h = source[perm[:, None], perm]
        h.diagonal()[dead[perm]] = 1.0
    else:
        h = source.clone()
        h.diagonal()[dead] = 1.0
    del source
    # The sweep works in place on W^T (a column of W a contiguous row), float32, made in one copy of the weight:
    # the solve's GPU memory is this, the dequantized weight and the uint8 codes (a 7B's gate+up: 0.34 GiB each).
    if static_groups:
        # GPTQModel's static groups: fitted now, on the weight as it is (dead inputs zeroed), in natural column
        # order; before the sweep's copy exists, and on the weight itself where nothing needs zeroing
        as_is = weight.detach().to(torch.float32)
        if bool(dead.any()):
            as_is = as_is.clone()
            as_is[:, dead] = 0.0
        fixed_scales, fixed_zeros = fit_group_grids(as_is, group_size, bits, sym, mse=mse, min_zero=min_zero)
        del as_is
    work = torch.empty(cols, rows, dtype=torch.float32, device=device)
    work.copy_(weight.detach().T)
    work[dead] = 0.0
    if desc_act:
        work = work[perm]
    upper, damp_used = inverse_hessian_cholesky(h, damp_percent, damp_auto_increment)
    del h
    if static_groups:
        scales, zeros = fixed_scales, fixed_zeros
        float_zeros = zeros.to(torch.float32)
        order = perm if desc_act else torch.arange(cols, device=device)
        position_groups = order // width

        def block_grid(work: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            # each column of the block its own group's grid (under act order a block's columns span groups)
            groups = position_groups[start:end]
            return scales[groups], float_zeros[groups]

        group_starts: list[int] = []
    else:
        scales = torch.empty(num_groups, rows, dtype=torch.float32, device=device)
        zeros = torch.empty(num_groups, rows, dtype=torch.int32, device=device)
        current: list[torch.Tensor] = []

        def block_grid(work: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            if start % width == 0:
                # bounds split at group starts: the group's columns now hold every earlier update
                group = start // width
                scales[group], zeros[group] = fit_grid(work[start : start + width].T, bits, sym, mse=mse,
                                                       min_zero=min_zero)
                current[:] = [scales[group], zeros[group].to(torch.float32)]
            return current[0], current[1]

        group_starts = list(range(0, cols, width))
    bounds = sorted(set(range(0, cols, block_size)) | set(group_starts)) + [cols]
    kernel_blocks = blocks_problem(work) is None
    codes_t, deq_t, loss = _solve_columns(work, upper, bounds, block_grid, bits, kernel_blocks)
    del work, upper  # before the outputs' copies are made

    error = 0.5 * float(loss)
    if not math.isfinite(error):
        raise QtoolError("GPTQ produced a non-finite error", "check the weight and the calibration activations of this linear")

    if desc_act:
        inverse = torch.argsort(perm)
        codes_t, deq_t = codes_t[inverse], deq_t[inverse]
        position_groups = torch.arange(cols, device=device, dtype=torch.int32) // width
        g_idx = natural_g_idx(cols, group_size, device) if static_groups else position_groups[inverse]
    else:
        g_idx = natural_g_idx(cols, group_size, device)
    quantized = QuantizedWeight(
        codes=codes_t.T.contiguous(),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size,
    )
    return GPTQResult(quantized, deq_t.T.contiguous(), error, damp_used, time.perf_counter() - started)
