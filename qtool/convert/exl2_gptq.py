"""One linear between the GPTQ and EXL2 representations (QuantizedWeight <-> Exl2Weight), with what each step
kept exactly and what it had to round.

GPTQ -> EXL2: every GPTQ group becomes one EXL2 group (act order becomes the permutation); its centered codes
code - zero are kept at the smallest EXL2 width that holds them (the GPTQ width for symmetric checkpoints, one
more for asymmetric ones). EXL2 stores a scale as level**2 * max/256 with a 4-bit level per column, so a
GPTQ scale survives only when it lies on that grid (always for a GPTQ model converted from EXL2); otherwise
each column takes the grid scale that, with the codes re-rounded, reproduces its weights best.

EXL2 -> GPTQ: every EXL2 group is cut into GPTQ groups of group_size rows (storage order, so act order is kept
through g_idx) with the EXL2 scales stored as they are. A group of b <= bits bits shifts its codes and is exact;
a wider group is rounded onto the nested grid of twice (four times, ...) its step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import EXL2_BITS, ROW_ALIGNMENT, SCALE_LEVELS, Exl2Weight, check_exl2_weight, exl2_scales
from qtool.formats.gptq import GPTQ_BITS
from qtool.formats.quantized_weight import QuantizedWeight


@dataclass
class LinearConversion:
    """What converting one linear did; rel_error = ||W_out - W_in||_F / ||W_in||_F of the dequantized weights."""

    name: str
    exact: bool
    rel_error: float
    source: str
    target: str
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref = reference.to(torch.float64)
    norm = float(ref.norm())
    diff = float((other.to(torch.float64) - ref).norm())
    return diff / norm if norm else diff


def _width_for_range(low: int, high: int) -> int | None:
    """The smallest EXL2 width whose symmetric code range -2**(b-1)..2**(b-1)-1 holds [low, high]."""
    for bits in sorted(EXL2_BITS):
        if -(1 << (bits - 1)) <= low and high <= (1 << (bits - 1)) - 1:
            return bits
    return None


def exact_scale_max(column_scales: torch.Tensor) -> torch.Tensor | None:
    """A q_scale_max (float16) whose 16-level grid holds every one of these scales exactly, or None.

    The largest scale sits on some level l of the grid it came from, so the grid's unit fp16(max/256) is
    fp16(s_max / l**2) or a float16 neighbour of it; q_scale_max = 256 * unit is then exact (also when the unit
    is subnormal)."""
    targets = column_scales.to(torch.float32)
    top = float(targets.max())
    if not top > 0 or not bool(torch.isfinite(targets).all()):
        return None
    levels = torch.arange(1, SCALE_LEVELS + 1, dtype=torch.float32, device=targets.device)
    near = (torch.tensor(top, device=targets.device) / levels.square()).to(torch.float16)
    bits = near.view(torch.int16).to(torch.int32)
    units = torch.cat([bits - 1, bits, bits + 1]).clamp(min=1).to(torch.int16).view(torch.float16).unique()
    for unit in units.tolist():
        scale_max = torch.tensor(unit * 256.0).to(torch.float16)
        if not bool(torch.isfinite(scale_max)):
            continue
        grid = exl2_scales(levels[None].to(torch.int32), scale_max.reshape(1))[0].to(torch.float32)
        if bool(torch.isin(targets, grid).all()):
            return scale_max
    return None


def fit_exl2_scales(values: torch.Tensor, column_scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one group: values float32 [N, r] (the weights to reproduce, one row per output column) and their
    current scales [N] -> (levels int32 [N] in 1..16, scale_max float16 scalar, codes int32 [N, r] of `bits` bits).

    scale_max is the largest scale (so the top level reproduces it); each column then takes the level whose
    grid, with the values re-rounded to it, gives the least squared error (an exact scale gives zero)."""
    scale_max = exact_scale_max(column_scales)
    if scale_max is None:
        scale_max = column_scales.max().to(torch.float16)
    levels = torch.arange(1, SCALE_LEVELS + 1, dtype=torch.int32, device=values.device)
    candidates = exl2_scales(levels[None, :], scale_max.reshape(1)).to(torch.float32)[0]  # [16]
    zero = 1 << (bits - 1)
    best_err = torch.full((values.shape[0],), float("inf"), dtype=torch.float64, device=values.device)
    best_level = torch.full((values.shape[0],), SCALE_LEVELS, dtype=torch.int32, device=values.device)
    for level, scale in zip(levels.tolist(), candidates.tolist()):
        if scale <= 0:
            continue
        centered = (values / scale).round().clamp(-zero, zero - 1)
        err = (centered * scale - values).to(torch.float64).square().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_level = torch.where(better, torch.full_like(best_level, level), best_level)
    chosen = candidates[best_level.long() - 1][:, None]
    safe = torch.where(chosen > 0, chosen, torch.ones_like(chosen))
    codes = (values / safe).round().clamp(-zero, zero - 1) + zero
    return best_level, scale_max, codes.to(torch.int32)


def exl2_from_gptq(qw: QuantizedWeight, name: str = "linear") -> tuple[Exl2Weight, LinearConversion]:
    """The EXL2 form of a GPTQ linear (see the module docstring) and what the conversion kept."""
    groups = qw.num_groups
    g_idx = qw.g_idx.to(torch.int64)
    codes_t = qw.codes.T.to(torch.int64)  # [K, N]
    scales = qw.scales.to(torch.float32)
    entries = []  # (bits, group, rows)
    for g in range(groups):
        rows = torch.nonzero(g_idx == g).flatten()
        if rows.numel() == 0:
            continue
        if rows.numel() % ROW_ALIGNMENT:
            raise QtoolError(
                f"{name}: GPTQ group {g} holds {rows.numel()} rows, but EXL2 groups hold multiples of {ROW_ALIGNMENT}",
                "convert this checkpoint to float and quantize it to EXL2 instead",
            )
        centered = codes_t[rows] - qw.zeros[g].to(torch.int64)[None, :]
        bits = _width_for_range(int(centered.min()), int(centered.max()))
        if bits is None:
            raise QtoolError(
                f"{name}: GPTQ group {g} spans codes {int(centered.min())}..{int(centered.max())} around its zero points, beyond 8-bit EXL2",
                "an 8-bit asymmetric GPTQ linear has no exact EXL2 form: convert to float and quantize to EXL2 instead",
            )
        entries.append((bits, g, rows))
    # ExLlamaV2 reads the widest groups first; a stable sort keeps GPTQ's group order within a width.
    entries.sort(key=lambda entry: -entry[0])
    all_codes, levels, maxima = [], [], []
    for bits, g, rows in entries:
        values = ((codes_t[rows] - qw.zeros[g].to(torch.int64)[None, :]).to(torch.float32) * scales[g][None, :]).T  # [N, r]
        level, scale_max, codes = fit_exl2_scales(values, scales[g], bits)
        all_codes.append(codes.T)
        levels.append(level)
        maxima.append(scale_max)
    weight = Exl2Weight(
        codes=torch.cat(all_codes).to(torch.int32).contiguous(),
        qscale=torch.stack(levels).to(torch.int32),
        scale_max=torch.stack(maxima).to(torch.float16),
        group_bits=tuple(bits for bits, _, _ in entries),
        group_sizes=tuple(int(rows.numel()) for _, _, rows in entries),
        perm=torch.cat([rows for _, _, rows in entries]),
    )
    check_exl2_weight(weight, name)
    source = qw.dequantize(torch.float32)
    error = relative_error(source, weight.dequantize(torch.float32))
    note = "" if error == 0.0 else "scales rounded to EXL2's 4-bit scale grid"
    gs = "per-channel" if qw.group_size == -1 else f"g{qw.group_size}"
    report = LinearConversion(name, error == 0.0, error, f"gptq {qw.bits}-bit {gs}", f"exl2 {describe_bits(weight)}", note)
    return weight, report


def describe_bits(weight: Exl2Weight) -> str:
    widths = sorted(set(weight.group_bits), reverse=True)
    return "/".join(map(str, widths)) + f"-bit, {weight.bits_per_weight():.2f} bpw"


def mean_code_bits(weights: dict[str, Exl2Weight]) -> float:
    """Bits per code over all linears (the q_weight payload, without scales)."""
    total = sum(w.code_bits() for w in weights.values())
    count = sum(w.in_features * w.out_features for w in weights.values())
    return total / count if count else 0.0


def nearest_gptq_bits(bits: float) -> int:
    """The GPTQ width closest to `bits` (the wider one on a tie)."""
    return min(GPTQ_BITS, key=lambda b: (abs(b - bits), -b))


def aligned_group_size(weights: dict[str, Exl2Weight]) -> int:
    """The largest group size that cuts every EXL2 group of every linear into whole GPTQ groups."""
    size = 0
    for w in weights.values():
        for rows in w.group_sizes:
            size = math.gcd(size, rows)
    return size


def gptq_from_exl2(weight: Exl2Weight, bits: int, group_size: int, name: str = "linear") -> tuple[QuantizedWeight, LinearConversion]:
    """A symmetric GPTQ linear of `bits` bits and groups of `group_size` storage rows holding the EXL2 weight
    (exactly when no group is wider than `bits`; see the module docstring)."""
    if bits not in GPTQ_BITS:
        raise QtoolError(f"{bits}-bit GPTQ is not supported", f"GPTQ widths are {', '.join(map(str, GPTQ_BITS))}")
    boundaries = [sum(weight.group_sizes[:g]) for g in range(1, weight.num_groups)]
    if group_size <= 0 or any(b % group_size for b in boundaries):
        raise QtoolError(
            f"{name}: GPTQ group size {group_size} does not cut the EXL2 groups {list(weight.group_sizes)} into whole groups",
            f"use a group size that divides every EXL2 group size, e.g. {math.gcd(*weight.group_sizes)}",
        )
    in_features = weight.in_features
    rows = torch.arange(in_features, device=weight.codes.device)
    gptq_group = rows // group_size  # of each storage row
    exl2_group = weight.row_group()
    first_rows = torch.arange(0, in_features, group_size, device=weight.codes.device)
    group_of_gptq = exl2_group[first_rows]  # each GPTQ group lies inside this EXL2 group
    src_bits = weight.row_bits()[:, None]
    centered = weight.codes.to(torch.int64) - torch.pow(2, src_bits - 1)
    shift = (src_bits - bits).clamp(min=0)
    half = 1 << (bits - 1)
    # Wider groups: the grid of 2**shift times the step, which holds every other (fourth, ...) old value.
    narrowed = torch.where(shift > 0, torch.round(centered.to(torch.float64) / torch.pow(2.0, shift)).to(torch.int64), centered)
    narrowed = narrowed.clamp(-half, half - 1)
    exl2_scale = weight.scales().to(torch.float32)
    step = torch.pow(2.0, (torch.tensor(weight.group_bits, device=weight.codes.device) - bits).clamp(min=0)).to(torch.float32)
    scales = (exl2_scale * step[:, None])[group_of_gptq]  # [G', N]
    if not bool(torch.isfinite(scales.to(torch.float16)).all()):
        raise QtoolError(f"{name}: a widened scale overflows float16", f"convert to more bits (e.g. --bits {max(GPTQ_BITS)})")
    codes = torch.empty_like(narrowed)
    codes[weight.perm] = narrowed + half  # back to input-feature order
    g_idx = torch.empty(in_features, dtype=torch.int32, device=weight.codes.device)
    g_idx[weight.perm] = gptq_group.to(torch.int32)
    qw = QuantizedWeight(
        codes=codes.T.to(torch.int32).contiguous(),
        scales=scales.contiguous(),
        zeros=torch.full((len(first_rows), weight.out_features), half, dtype=torch.int32, device=weight.codes.device),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
    )
    error = relative_error(weight.dequantize(torch.float32), qw.dequantize(torch.float32))
    wider = sorted({b for b in weight.group_bits if b > bits}, reverse=True)
    note = f"{'/'.join(map(str, wider))}-bit groups rounded to {bits} bits" if wider else ""
    report = LinearConversion(name, not wider and error == 0.0, error, f"exl2 {describe_bits(weight)}", f"gptq {bits}-bit g{group_size}", note)
    return qw, report
