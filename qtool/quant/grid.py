"""The uniform quantization grid of GPTQ/RTN: per-row scale and true zero point fitted to a group of weights
(min/max rule, optional MSE clipping search), and the maps weight -> integer code -> weight."""

from __future__ import annotations

import torch

from qtool.core.errors import QtoolError
from qtool.formats.gptq import PER_CHANNEL_GROUP_SIZE, check_gptq_bits, check_group_size

# GPTQ's clipping search: shrink factors 1, 0.99, ... (grid steps, down to 1 - max_shrink), scored by sum |err|^norm.
DEFAULT_MSE_NORM = 2.4
DEFAULT_MSE_GRID = 100
DEFAULT_MSE_MAX_SHRINK = 0.8

# Elements per temporary of the MSE search (16 MiB of float32; two such temporaries live at a time).
_MSE_CHUNK_ELEMENTS = 1 << 22

# Keeps scales positive when a row's range underflows (e.g. weights of 1e-45).
_SCALE_FLOOR = torch.finfo(torch.float32).tiny


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def symmetric_zero(bits: int) -> int:
    """The zero point of symmetric quantization, 2**(bits-1) (8 for 4-bit), as GPTQ stores it."""
    return 1 << (bits - 1)


def _params_for_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (float, integral) for rows whose range [xmin, xmax] contains 0 and is not empty."""
    maxq = max_code(bits)
    if sym:
        # Codes run from -2**(bits-1) to 2**(bits-1)-1 around the zero, so the step spans 2*absmax / maxq.
        scale = (2.0 * xmax / maxq).clamp_min(_SCALE_FLOOR)
        zero = torch.full_like(scale, float(symmetric_zero(bits)))
        return scale, zero
    scale = ((xmax - xmin) / maxq).clamp_min(_SCALE_FLOOR)
    zero = torch.round(-xmin / scale)
    if min_zero > 0:
        # The zero point is pinned up to min_zero; the step widens so that xmax stays representable rather
        # than clipped: codes then cover [-min_zero, maxq - min_zero] steps, and xmin >= -scale/2 holds here.
        low = zero < min_zero
        scale = torch.where(low, (xmax / (maxq - min_zero)).clamp_min(_SCALE_FLOOR), scale)
    zero = zero.clamp(min_zero, maxq)
    return scale, zero


def _row_ranges(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [xmin, xmax] widened to contain 0 (so 0 is exact on the grid); all-zero rows get [-1, 1]."""
    zeros = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    xmin = torch.minimum(w.amin(dim=1), zeros)
    xmax = torch.maximum(w.amax(dim=1), zeros)
    if sym:
        # Always [-absmax, absmax]. (GPTQ's reference code keeps xmin = 0 for a row with no negative weight,
        # which puts the row's maximum 7/15 of the way up a 4-bit grid and clips it: not copied.)
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = xmax == xmin
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    return xmin, xmax


def fit_grid(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    min_zero: int = 0,
    mse_norm: float = DEFAULT_MSE_NORM,
    mse_grid: int = DEFAULT_MSE_GRID,
    mse_max_shrink: float = DEFAULT_MSE_MAX_SHRINK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 [rows], > 0) and true zero point (int32 [rows], in min_zero..2**bits-1) per row of w
    [rows, cols]. With mse, the range is shrunk by factors 1, 1 - 1/grid, ... and each row keeps the factor with
    the smallest sum |w - dequant|**mse_norm (factor 1, the min/max grid, is always a candidate)."""
    check_gptq_bits(bits, "quantization grid")
    w = w.to(torch.float32)
    xmin, xmax = _row_ranges(w, sym)
    scale, zero = _params_for_range(xmin, xmax, bits, sym, min_zero)
    if mse:
        shrinks = 1.0 - torch.arange(int(mse_max_shrink * mse_grid), dtype=torch.float32, device=w.device) / mse_grid
        best = torch.full_like(scale, float("inf"))
        # Candidates are scored a chunk at a time ([chunk, rows, cols]): few large ops rather than many small ones.
        chunk = max(1, _MSE_CHUNK_ELEMENTS // max(w.numel(), 1))
        for shrink in shrinks.split(chunk):
            cand_scale, cand_zero = _params_for_range(shrink[:, None] * xmin, shrink[:, None] * xmax, bits, sym, min_zero)
            codes = round_to_grid(w, cand_scale[..., None], cand_zero[..., None], bits)
            deq = codes.sub_(cand_zero[..., None]).mul_(cand_scale[..., None])  # dequantize_codes, in place
            err = deq.sub_(w).abs_().pow_(mse_norm).sum(dim=2)
            # min returns the first of equal errors, so the widest range wins ties, as in a sequential search.
            chunk_best, pick = err.min(dim=0)
            better = chunk_best < best
            best = torch.where(better, chunk_best, best)
            scale = torch.where(better, cand_scale.gather(0, pick[None])[0], scale)
            zero = torch.where(better, cand_zero.gather(0, pick[None])[0], zero)
    return scale, zero.to(torch.int32)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes clamp(round(w / scale) + zero, 0, 2**bits-1), kept in float32 (integral values)."""
    q = (w / scale).round_().add_(zero.to(torch.float32))
    return q.clamp_(0, max_code(bits))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(w / scale) + zero, 0, 2**bits-1) as int32; scale and zero broadcast against w."""
    return round_to_grid(w, scale, zero, bits).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale * (codes - zero) in float32, the same arithmetic as QuantizedWeight.dequantize (bit for bit)."""
    return scale.to(torch.float32) * (codes.to(torch.float32) - zero.to(torch.float32))


def natural_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """g_idx (int32 [in_features]) of consecutive groups: column i belongs to group i // group_size."""
    width = in_features if group_size == PER_CHANNEL_GROUP_SIZE else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // width


def fit_group_grids(
    w: torch.Tensor, group_size: int, bits: int, sym: bool, mse: bool = False, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_grid on each group of consecutive columns of w [rows, cols] (group_size -1: one group; the last
    group may be partial): scales float32 [groups, rows], zeros int32 [groups, rows]."""
    rows, cols = w.shape
    width = cols if group_size == PER_CHANNEL_GROUP_SIZE else group_size
    full = cols // width
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    if full:
        # All full groups in one call: [rows, full * width] -> [full * rows, width], group-major.
        grouped = w[:, : full * width].reshape(rows, full, width).transpose(0, 1).reshape(full * rows, width)
        scale, zero = fit_grid(grouped, bits, sym, mse=mse, min_zero=min_zero)
        scales.append(scale.reshape(full, rows))
        zeros.append(zero.reshape(full, rows))
    if full * width < cols:
        scale, zero = fit_grid(w[:, full * width :], bits, sym, mse=mse, min_zero=min_zero)
        scales.append(scale[None])
        zeros.append(zero[None])
    return torch.cat(scales), torch.cat(zeros)


def check_grid_options(weight: torch.Tensor, bits: int, group_size: int, min_zero: int) -> None:
    """Raise QtoolError unless weight is a finite 2-D tensor and the grid options are valid for it."""
    if weight.dim() != 2:
        raise QtoolError(f"weight has shape {tuple(weight.shape)}", "pass a 2-D weight [out_features, in_features]")
    check_gptq_bits(bits, "quantization grid")
    check_group_size(group_size, "quantization grid")
    if not 0 <= min_zero < max_code(bits):
        raise QtoolError(f"min_zero={min_zero} is out of range for {bits}-bit codes", "use 0, or 1 for GPTQ v1 files with asym")
    if not torch.isfinite(weight).all():
        raise QtoolError("weight holds NaN or infinite values", "check the checkpoint this weight came from")
