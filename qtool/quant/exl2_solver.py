"""EXL2 quantization of one linear: GPTQ with act order and a bit width per group, scales on ExLlamaV2's grid
(level**2 * max/256, a 4-bit level per column), as ExLlamaV2's AdaptiveGPTQ does it (facts from its source,
code written here). Also the candidate settings ("bits 4/3 over 10%/90% of the rows, groups of 128") whose
errors the measurement pass records and among which the optimizer picks.

Orientation follows the EXL2 layout: rows are input features in act order (descending Hessian diagonal)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import EXL2_BITS, ROW_ALIGNMENT, SCALE_LEVELS, Exl2Weight, check_exl2_layout, exl2_scale_unit, exl2_scales
from qtool.kernels.gptq_block_triton import blocks_problem, solve_row_block, solve_rows
from qtool.models.rules import device_free_memory
from qtool.quant.gptq import inverse_hessian_cholesky

# ExLlamaV2's scale search: the group's largest scale times p in [MIN_P, MAX_P] (P_GRID + 1 points), scored by
# sum |w - dequant|**3.5 over the group.
MIN_P, MAX_P, P_GRID = 0.70, 1.20, 96
_SEARCH_ELEMENTS = 1 << 23  # elements of one p-chunk temporary
_SEARCH_ELEMENTS_CUDA = 1 << 26  # a GPU takes larger chunks: fewer, fuller launches
SMALLEST_FLOAT16 = 2.0**-24  # the smallest positive (subnormal) float16


@dataclass(frozen=True)
class Exl2Candidate:
    """One quantization setting of a linear, as ExLlamaV2's QParams: widths (widest first), the share of rows at
    each width, and the group size of each width."""

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: tuple[int, ...]

    def __post_init__(self):
        if not self.bits or len(self.bits) != len(self.bits_prop) or len(self.bits) != len(self.group_size):
            raise QtoolError(f"candidate {self}: one share and one group size per width are needed")
        if any(b not in EXL2_BITS for b in self.bits) or list(self.bits) != sorted(self.bits, reverse=True):
            raise QtoolError(f"candidate widths {self.bits} must be EXL2 widths, widest first")
        if abs(sum(self.bits_prop) - 1) > 1e-6 or any(p <= 0 for p in self.bits_prop):
            raise QtoolError(f"candidate shares {self.bits_prop} must be positive and add up to 1")
        if any(g <= 0 or g % ROW_ALIGNMENT for g in self.group_size):
            raise QtoolError(f"candidate group sizes {self.group_size} must be positive multiples of {ROW_ALIGNMENT}")

    def layout(self, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(bits, rows) of each group: ceil(rows * share / group size) groups per width in turn, the last group
        cut to the rows left (ExLlamaV2's rule)."""
        group_bits, group_sizes, left = [], [], in_features
        for bits, share, size in zip(self.bits, self.bits_prop, self.group_size):
            count = math.ceil(min(in_features * share, left) / size)
            for _ in range(count):
                if left <= 0:
                    break
                rows = min(size, left)
                group_bits.append(bits)
                group_sizes.append(rows)
                left -= rows
        if left > 0:  # shares rounded down: the narrowest width takes the rest
            while left > 0:
                rows = min(self.group_size[-1], left)
                group_bits.append(self.bits[-1])
                group_sizes.append(rows)
                left -= rows
        return tuple(group_bits), tuple(group_sizes)

    def total_bits(self, in_features: int, out_features: int) -> int:
        """Bits of every tensor of the linear, as Exl2Weight.storage_bits counts them."""
        group_bits, group_sizes = self.layout(in_features)
        groups = len(group_bits)
        codes = sum(b * r for b, r in zip(group_bits, group_sizes)) * out_features
        return codes + groups * out_features * 4 + groups * 16 + groups * 32 + in_features * 32

    def bpw(self, in_features: int, out_features: int) -> float:
        return self.total_bits(in_features, out_features) / (in_features * out_features)

    def describe(self) -> str:
        return "/".join(f"{p:g}:{b}b_{g}g" for b, p, g in zip(self.bits, self.bits_prop, self.group_size))

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "bits_prop": list(self.bits_prop), "group_size": list(self.group_size)}

    @classmethod
    def from_dict(cls, data: dict) -> "Exl2Candidate":
        return cls(tuple(int(b) for b in data["bits"]), tuple(float(p) for p in data["bits_prop"]), tuple(int(g) for g in data["group_size"]))


@dataclass
class Exl2Result:
    weight: Exl2Weight
    dequantized: torch.Tensor  # float32 [out, in], equal to weight.dequantize()
    error: float  # tr(dW H dW^T) / tr(W H W^T) with the undamped Hessian: the relative output error
    damp_percent: float
    seconds: float


def fit_group_scales(x: torch.Tensor, bits: int, p_grid: int = P_GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales of one group x [rows, N] (storage orientation): levels int32 [N] in 1..16, q_scale_max float16
    (scalar) and the float16 scales [N] the kernels will use.

    Each column's natural scale absmax / (maxq/2) becomes the level nearest on a square-root scale below the
    group's largest; then the whole grid is stretched by the p in [0.7, 1.2] with the least sum |err|**3.5."""
    levels, scale_max, scales = fit_group_scales_batched(x[None], bits, p_grid)
    return levels[0], scale_max[0], scales[0]


def fit_group_scales_batched(x: torch.Tensor, bits: int | torch.Tensor,
                             p_grid: int = P_GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fit_group_scales of B groups at once, x [B, rows, N] (each its own largest scale and stretch; rows of zeros
    change nothing, so groups of fewer rows can be padded with them), bits one width or one per group [B]:
    levels int32 [B, N], q_scale_max float16 [B], scales float16 [B, N]."""
    if isinstance(bits, int):
        maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    else:  # per group: [B, 1] against [B, N], [B, 1, 1] against each p's [B, rows, N]
        maxq = (2.0 ** bits.to(torch.float32) - 1).view(-1, 1)
        zero = (2.0 ** (bits.to(torch.float32) - 1)).view(-1, 1, 1)
    xf = x.to(torch.float32)
    base = (xf.abs().amax(dim=1) + 1e-12) / (maxq / 2)  # [B, N]
    top = base.amax(dim=1, keepdim=True)  # [B, 1]
    levels = torch.clamp(torch.round(torch.sqrt(base / top) * SCALE_LEVELS), 1, SCALE_LEVELS)
    grid = (levels / SCALE_LEVELS).square() * top  # [B, N]
    ps = MIN_P + (MAX_P - MIN_P) * torch.arange(p_grid + 1, dtype=torch.float32, device=x.device) / p_grid
    errors = torch.empty(ps.numel(), x.shape[0], dtype=torch.float32, device=x.device)
    elements = _SEARCH_ELEMENTS_CUDA if x.is_cuda else _SEARCH_ELEMENTS
    chunk = max(1, elements // max(xf.numel(), 1))
    for start in range(0, ps.numel(), chunk):
        scale = ps[start : start + chunk, None, None, None] * grid[None, :, None, :]  # [p, B, 1, N]
        if isinstance(bits, int):
            q = torch.clamp(torch.round(xf[None] / scale), -zero, maxq - zero)
        else:
            q = torch.clamp(torch.round(xf[None] / scale), -zero, maxq[:, :, None] - zero)
        miss = (q * scale - xf[None]).abs()
        errors[start : start + chunk] = (miss.square() * miss * miss.sqrt()).sum(dim=(2, 3))  # |err|**3.5 without pow
    best = ps[torch.argmin(errors, dim=0)]  # [B]
    # An all-zero group would round to a q_scale_max of 0, which readers refuse: the smallest float16 keeps it
    # positive and still dequantizes to zero (q_scale_max / 256 rounds to 0).
    scale_max = (top[:, 0] * best).to(torch.float16).clamp_min(SMALLEST_FLOAT16)
    levels = levels.to(torch.int32)
    return levels, scale_max, exl2_scales(levels, scale_max)


@dataclass(frozen=True)
class PreparedLinear:
    """What the solver needs of one linear whatever its widths: its rows in act order with dead inputs zeroed, the
    permutation, the upper Cholesky factor of the damped inverse Hessian and the damping it took, and tr(W H W^T).
    A measurement pass quantizes each linear with many candidates and prepares it once."""

    rows: torch.Tensor  # float32 [K, N], act order
    perm: torch.Tensor
    upper: torch.Tensor
    damp: float
    output_energy: float


def prepare_linear(weight: torch.Tensor, hessian: torch.Tensor, act_order: bool = True, damp_percent: float = 0.01,
                   damp_auto_increment: float = 0.0025) -> PreparedLinear:
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features) or not bool(torch.isfinite(hessian).all()):
        raise QtoolError(f"the Hessian must be a finite [{in_features}, {in_features}] matrix, got {tuple(hessian.shape)}", "pass the Hessian of this linear's inputs")
    h = hessian.to(torch.float32).clone()
    w = weight.detach().to(torch.float32).T.clone()  # [K, N]
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[dead] = 0.0  # inputs never seen: their weights cannot matter on this data
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(in_features, device=w.device)
    upper, damp = inverse_hessian_cholesky(h[perm][:, perm], damp_percent, damp_auto_increment)
    original = weight.detach().to(torch.float32)
    energy = float(((original @ hessian.to(torch.float32)) * original).sum())
    return PreparedLinear(w[perm], perm, upper, damp, energy)


def exl2_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_bits: tuple[int, ...],
    group_sizes: tuple[int, ...],
    act_order: bool = True,
    damp_percent: float = 0.01,
    damp_auto_increment: float = 0.0025,
    p_grid: int = P_GRID,
    refine: bool = False,
    prepared: PreparedLinear | None = None,
) -> Exl2Result:
    """EXL2-quantize weight [N, K] given the Hessian [K, K] of its inputs (neither is modified). Groups (widest
    first) cover the rows in act order; each group's scales are fitted when the solver reaches it, on the
    weights as updated by every row before (GPTQ error feedback). p_grid: points of the scale search (a coarser
    search makes a measurement pass cheaper); refine: refit the scale levels and maxima afterwards
    (refine_exl2_levels); prepared: prepare_linear's result for this weight and Hessian, reused across calls."""
    started = time.perf_counter()
    out_features, in_features = weight.shape
    check_exl2_layout(in_features, out_features, tuple(group_bits), tuple(group_sizes))
    if prepared is None:
        prepared = prepare_linear(weight, hessian, act_order, damp_percent, damp_auto_increment)
    codes, levels, maxima = _solve_groups(prepared.rows.clone(), prepared.upper, group_bits, group_sizes, p_grid)
    result = Exl2Weight(codes=codes, qscale=levels, scale_max=maxima, group_bits=tuple(group_bits), group_sizes=tuple(group_sizes), perm=prepared.perm)
    if refine:
        # (Choosing the codes again on the refit scales and refitting once more lowered the linears' errors but not
        # SmolLM2's perplexity: 4.0 bpw 25.02 -> 25.06, 3.0 bpw 38.66 -> 38.80; bench/RESULTS.md.)
        result = refine_exl2_levels(weight, result, hessian)
    dequantized = result.dequantize(torch.float32)
    error = relative_output_error(weight, dequantized, hessian, prepared.output_energy)
    return Exl2Result(result, dequantized, error, prepared.damp, time.perf_counter() - started)


def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor, output_energy: float | None = None) -> float:
    """tr(dW H dW^T) / tr(W H W^T) with the undamped Hessian (the denominator given as output_energy when known)."""
    original = weight.detach().to(torch.float32)
    hs = hessian.to(torch.float32)
    if output_energy is None:
        output_energy = float(((original @ hs) * original).sum())
    delta = dequantized.to(torch.float32) - original
    return float(((delta @ hs) * delta).sum()) / output_energy if output_energy > 0 else 0.0


def _solve_groups(w: torch.Tensor, upper: torch.Tensor, group_bits: tuple[int, ...], group_sizes: tuple[int, ...],
                  p_grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ over the rows of w [K, N] (act order applied; modified in place) with the upper Cholesky factor of the
    inverse Hessian: codes int32 [K, N], levels int32 [G, N] and q_scale_max float16 [G]. Each group's scales are
    fitted when the solver reaches it (fit_group_scales), on the rows as the error feedback has left them."""
    codes = torch.empty_like(w, dtype=torch.int32)
    levels, maxima = [], []
    start = 0
    # on a GPU each group's rows go through solve_rows (one kernel per 64 rows) instead of a handful of small
    # launches per row
    kernel_blocks = blocks_problem(w) is None
    for bits, rows in zip(group_bits, group_sizes):
        end = start + rows
        level, scale_max, scale = fit_group_scales(w[start:end], bits, p_grid)
        scale = scale.to(torch.float32)
        # A group of (near) zero weights has scales that round to 0: its codes are the zero code, not 0/0 = NaN.
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        levels.append(level)
        maxima.append(scale_max)
        zero = 1 << (bits - 1)
        if kernel_blocks:
            low, high = torch.full_like(scale, -zero), torch.full_like(scale, zero - 1)
            _, errors, q = solve_rows(w[start:end], divisor, scale, torch.zeros_like(scale), low, high,
                                      upper[start:end, start:end])
            codes[start:end] = (q + zero).to(torch.int32)
        else:
            errors = torch.empty(rows, w.shape[1], dtype=torch.float32, device=w.device)
            for i in range(start, end):
                q = torch.clamp(torch.round(w[i] / divisor), -zero, zero - 1)
                codes[i] = (q + zero).to(torch.int32)
                err = (w[i] - q * scale) / upper[i, i]
                errors[i - start] = err
                w[i + 1 : end].addr_(upper[i, i + 1 : end], err, alpha=-1.0)
        if end < w.shape[0]:
            w[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1.0)
        start = end
    return codes, torch.stack(levels), torch.stack(maxima)


# Bytes of float32 work the batched measurement may hold per pass (two [K, candidates x N] matrices and the error
# product's third): a linear's candidates are solved together in as few passes as fit in it. On a GPU a quarter of
# its free memory (within a per-process cap), within these bounds: a 7B down_proj's candidate takes 0.5 GB, and
# each pass repeats the row blocks
MEASURE_BATCH_BYTES = 1 << 30
MEASURE_BATCH_BYTES_CUDA = 32 << 30
BLOCK_ROWS = ROW_ALIGNMENT  # every group boundary of every candidate falls on a multiple of it


def candidate_errors(prepared: PreparedLinear, weight: torch.Tensor, hessian: torch.Tensor,
                     layouts: list[tuple[tuple[int, ...], tuple[int, ...]]], p_grid: int = P_GRID,
                     batch_bytes: int | None = None) -> list[float]:
    """The relative output error exl2_quantize gives for each layout (group widths, group rows), computed for many
    candidates in one GPTQ pass: their copies of the rows side by side ([K, C x N]), each block of BLOCK_ROWS rows
    (where every candidate's groups begin) solved for all of them at once (kernels/gptq_block_triton: one launch
    on a GPU), lazy updates after each block, and each group's scales fitted, as exl2_quantize fits them, when the
    pass reaches its first row (the groups of one size starting at a row in one call). A measurement pass solves
    30 candidates per linear: one at a time that is K steps of small ops each, which a GPU spends launching them.
    Equal to exl2_quantize's errors but for float32 sums in another order (a code may round the other way)."""
    in_features, out_features = prepared.rows.shape
    per_candidate = 3 * in_features * out_features * 4
    if batch_bytes is None:
        batch_bytes = MEASURE_BATCH_BYTES
        free = device_free_memory(prepared.rows.device)
        if free is not None:
            batch_bytes = min(max(free // 4, MEASURE_BATCH_BYTES), MEASURE_BATCH_BYTES_CUDA)
    size = max(1, batch_bytes // per_candidate)
    errors: list[float] = []
    for start in range(0, len(layouts), size):
        errors += _batched_errors(prepared, weight, hessian, layouts[start : start + size], p_grid)
    return errors


def _batched_errors(prepared: PreparedLinear, weight: torch.Tensor, hessian: torch.Tensor,
                    layouts: list[tuple[tuple[int, ...], tuple[int, ...]]], p_grid: int) -> list[float]:
    rows, upper = prepared.rows, prepared.upper
    in_features, n = rows.shape
    count = len(layouts)
    for group_bits, group_sizes in layouts:
        check_exl2_layout(in_features, n, tuple(group_bits), tuple(group_sizes))
    # each row that starts a group: the (candidate, width, group rows) of the groups starting there
    starts: dict[int, list[tuple[int, int, int]]] = {}
    for index, (group_bits, group_sizes) in enumerate(layouts):
        row = 0
        for bits, size in zip(group_bits, group_sizes):
            starts.setdefault(row, []).append((index, bits, size))
            row += size
    w = rows.repeat(1, count)  # [K, C * N]: candidate c's copy in columns c*N .. (c+1)*N
    dequantized = torch.empty_like(w)
    scale = torch.empty(count * n, dtype=torch.float32, device=w.device)
    low, high, divisor = torch.empty_like(scale), torch.empty_like(scale), torch.empty_like(scale)
    zeros = torch.zeros_like(scale)  # EXL2's codes are centred: no zero point
    for block in range(0, in_features, BLOCK_ROWS):  # groups begin only at a block's first row
        end = min(block + BLOCK_ROWS, in_features)
        for size in sorted({size for _, _, size in starts.get(block, ())}):
            # the groups of one size starting here fitted in one call, a width each (padding shorter groups with
            # zero rows would fit all sizes at once, at the cost of the tallest group's work for every one)
            members, widths = (torch.tensor(field, device=w.device)
                               for field in zip(*[(c, bits) for c, bits, rows in starts[block] if rows == size]))
            columns = (members[:, None] * n + torch.arange(n, device=w.device)).reshape(-1)
            group = w[block : block + size, columns].view(size, len(members), n).permute(1, 0, 2)
            _, _, group_scales = fit_group_scales_batched(group, widths, p_grid)
            scale[columns] = group_scales.reshape(-1).to(torch.float32)
            zero = (2.0 ** (widths.to(torch.float32) - 1)).repeat_interleave(n)
            low[columns], high[columns] = -zero, zero - 1
        if block in starts:
            # a group of (near) zero weights has scales that round to 0: its codes are the zero code, not 0/0
            torch.where(scale > 0, scale, torch.ones_like(scale), out=divisor)
        dequantized[block:end], errors, _ = solve_row_block(w[block:end], divisor, scale, zeros, low, high,
                                                            upper[block:end, block:end])
        if end < in_features:
            w[end:].addmm_(upper[block:end, end:].T, errors, alpha=-1.0)
    # tr(dW H dW^T) in act order: the permuted Hessian of the original weight (dead inputs' rows of H are zero)
    del w
    perm = prepared.perm
    original = weight.detach().to(torch.float32)[:, perm].T  # [K, N] act order
    h = hessian.to(torch.float32)[perm][:, perm]
    delta = dequantized.view(in_features, count, n).sub_(original[:, None, :]).view(in_features, count * n)
    products = ((h @ delta) * delta).sum(dim=0).view(count, n).sum(dim=1)
    energy = prepared.output_energy
    return [float(p) / energy if energy > 0 else 0.0 for p in products]


# Relative ridge on the refit systems, as GPTQ damps its Hessian (see quant/refine.py).
REFINE_DAMP = 0.01


def refine_exl2_levels(weight: torch.Tensor, quantized: Exl2Weight, hessian: torch.Tensor) -> Exl2Weight:
    """Scale refinement on EXL2's grid, codes fixed: the scale of each (group, output) that minimises
    tr((W - W_q) H (W - W_q)^T) is the solution of one small linear system per output (one unknown per group, as
    quant/refine.py does for GPTQ); it is rounded to the nearest of the 16 levels (level**2 * q_scale_max / 256).
    With each group's q_scale_max kept, an output keeps its old levels unless the rounded ones lower its error;
    a searched q_scale_max per group (_nearest_grid_maxima) replaces that result only when the linear's whole
    error drops. Either way the result is never worse than the input on the calibration Hessian (damped)."""
    perm = quantized.perm.to(weight.device)
    w = weight.detach().to(torch.float32)[:, perm]  # [N, K], inputs in storage order
    h = hessian.detach().to(device=w.device, dtype=torch.float32)[perm][:, perm].clone()
    h.diagonal().add_(REFINE_DAMP * h.diagonal().mean())
    group = quantized.row_group().to(w.device)
    p = (quantized.codes.to(torch.float32) - quantized.row_zero().to(torch.float32)[:, None]).T.to(w.device)  # [N, K]
    groups = quantized.num_groups
    one_hot = torch.nn.functional.one_hot(group, groups).to(torch.float32)  # [K, G]
    system = torch.empty(w.shape[0], groups, groups, dtype=torch.float32, device=w.device)
    for g in range(groups):
        rows = (group == g).nonzero().squeeze(1)
        system[:, g, :] = ((p[:, rows] @ h[rows]) * p) @ one_hot
    rhs = ((w @ h) * p) @ one_hot  # [N, G]
    best, info = torch.linalg.solve_ex(system, rhs)
    solved = (info == 0).unsqueeze(1) & torch.isfinite(best)  # [N, 1]
    old_levels = quantized.qscale.T.to(w.device, torch.float32)

    def levels_for(scale_max: torch.Tensor) -> torch.Tensor:  # [G] -> the level nearest each output's optimum [N, G]
        levels = torch.sqrt(best.clamp_min(0) / exl2_scale_unit(scale_max).to(w.device)).round().clamp(1, SCALE_LEVELS)
        return torch.where(solved, levels, old_levels)

    def output_errors(qscale: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:  # qscale [G, N] -> error of each output
        scales = exl2_scales(qscale, scale_max.to(w.device)).to(torch.float32)  # [G, N]
        diff = w - scales.T[:, group] * p
        return ((diff @ h) * diff).sum(dim=1)

    # Same q_scale_max: each output keeps its old levels unless the refit ones lower its error.
    old = quantized.qscale.to(w.device)
    new = levels_for(quantized.scale_max).T.to(torch.int32)
    scale_max = quantized.scale_max
    old_errors, new_errors = output_errors(old, scale_max), output_errors(new, scale_max)
    qscale = torch.where((new_errors < old_errors).unsqueeze(0), new, old)
    refit_error = float(torch.minimum(new_errors, old_errors).sum())
    # A new q_scale_max per group as well: the one whose level grid lands nearest the outputs' optima (weighted by
    # each optimum's own curvature); taken for the whole linear only when it lowers the linear's error.
    moved_max = _nearest_grid_maxima(best, system.diagonal(dim1=1, dim2=2), solved, quantized.scale_max.to(w.device))
    moved = levels_for(moved_max).T.to(torch.int32)
    if float(output_errors(moved, moved_max).sum()) < refit_error:
        qscale, scale_max = moved, moved_max.to(quantized.scale_max.device)
    return Exl2Weight(codes=quantized.codes, qscale=qscale.to(quantized.qscale.device), scale_max=scale_max,
                      group_bits=quantized.group_bits, group_sizes=quantized.group_sizes, perm=quantized.perm)


# Multiples of a group's q_scale_max tried by the refit (its level grid is coarse: 12% steps at the top level).
MAX_SEARCH = torch.linspace(0.7, 1.3, 61)


def _nearest_grid_maxima(best: torch.Tensor, curvature: torch.Tensor, solved: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """Per group, the float16 q_scale_max among MAX_SEARCH multiples of the current one (and the largest optimum)
    minimising sum_n curvature[n, g] * (scale on the grid - best[n, g])**2 over the solved outputs."""
    target = torch.where(solved, best.clamp_min(0), torch.zeros_like(best))  # [N, G]
    weight = torch.where(solved, curvature.clamp_min(0), torch.zeros_like(curvature))
    factors = MAX_SEARCH.to(best.device)
    tried = torch.cat([scale_max.to(torch.float32)[None] * factors[:, None], target.amax(dim=0)[None]]).to(torch.float16)  # [F, G]
    tried = torch.where(tried > 0, tried, scale_max.to(torch.float16)[None])
    unit = exl2_scale_unit(tried)  # [F, G]
    levels = torch.sqrt(target[None] / unit[:, None, :]).round().clamp(1, SCALE_LEVELS)  # [F, N, G]
    scales = (levels.square() * unit[:, None, :]).to(torch.float16).to(torch.float32)
    cost = (weight[None] * (scales - target[None]).square()).sum(dim=1)  # [F, G]
    return tried.gather(0, cost.argmin(dim=0, keepdim=True))[0]
