"""The quantization grid against a float64 reference written here: min/max rule, sym/asym, min_zero, the MSE
clipping search, degenerate rows, group fitting, every bit width."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.quant.grid import (
    check_grid_options,
    dequantize_codes,
    fit_grid,
    fit_group_grids,
    natural_g_idx,
    quantize_codes,
)

BITS = (2, 3, 4, 8)


def reference_params(row: list[float], bits: int, sym: bool, min_zero: int, shrink: float = 1.0) -> tuple[float, int]:
    """One row's (scale, zero) by the GPTQ min/max rule, in Python floats (float64)."""
    maxq = 2**bits - 1
    lo, hi = min(0.0, min(row)), max(0.0, max(row))
    if sym:
        hi = max(-lo, hi)
        lo = -hi
    if lo == hi:
        lo, hi = -1.0, 1.0
    lo, hi = shrink * lo, shrink * hi
    if sym:
        return 2 * hi / maxq, 2 ** (bits - 1)
    scale = (hi - lo) / maxq
    zero = round(-lo / scale)
    if zero < min_zero:
        zero, scale = min_zero, hi / (maxq - min_zero)
    return scale, min(zero, maxq)


def reference_dequant(row: list[float], scale: float, zero: int, bits: int) -> list[float]:
    maxq = 2**bits - 1
    return [scale * (min(max(round(x / scale) + zero, 0), maxq) - zero) for x in row]


def row_error(row: list[float], deq: list[float], norm: float) -> float:
    return sum(abs(a - b) ** norm for a, b in zip(row, deq))


def random_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of mixed character: centred, shifted positive, shifted negative, heavy tailed."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 0.1
    w[1::4] = w[1::4].abs() + 0.01  # all positive: asym zero point 0
    w[2::4] = -w[2::4].abs()
    heavy = torch.randn(rows, cols, generator=gen) / torch.rand(rows, cols, generator=gen).clamp_min(0.05)
    w[3::4] = heavy[3::4] * 0.002
    return w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("min_zero", [0, 1])
def test_min_max_grid_matches_float64_reference(bits, sym, min_zero):
    w = random_rows(40, 57, seed=bits * 10 + sym + 3 * min_zero)
    scale, zero = fit_grid(w, bits, sym, min_zero=min_zero)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert scale.shape == zero.shape == (40,)
    codes = quantize_codes(w, scale[:, None], zero[:, None], bits)
    deq = dequantize_codes(codes, scale[:, None], zero[:, None])
    for r in range(w.shape[0]):
        row = w[r].double().tolist()
        ref_scale, ref_zero = reference_params(row, bits, sym, min_zero)
        assert math.isclose(float(scale[r]), ref_scale, rel_tol=1e-6)
        assert int(zero[r]) == ref_zero
        ref = reference_dequant(row, ref_scale, ref_zero, bits)
        for x, got, want in zip(row, deq[r].tolist(), ref):
            if not math.isclose(got, want, rel_tol=1e-5, abs_tol=ref_scale * 1e-3):
                # float32 may round the other way only on a tie (sym puts -absmax on one: -maxq/2 steps).
                steps = x / ref_scale
                assert abs(steps - math.floor(steps) - 0.5) < 1e-4
                assert abs(got - want) == pytest.approx(ref_scale, rel=1e-4)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    assert int(zero.min()) >= min_zero


@pytest.mark.parametrize("bits", BITS)
def test_asym_min_max_error_is_at_most_half_a_step(bits):
    w = random_rows(32, 64, seed=bits)
    for min_zero in (0, 1):
        scale, zero = fit_grid(w, bits, sym=False, min_zero=min_zero)
        deq = dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
        assert ((w - deq).abs() <= scale[:, None] * 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_zero_is_exactly_representable(bits, sym):
    w = random_rows(16, 33, seed=7 + bits)
    w[:, 5] = 0.0
    scale, zero = fit_grid(w, bits, sym)
    deq = dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
    assert (deq[:, 5] == 0).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("min_zero", [0, 1])
def test_degenerate_rows_give_finite_positive_scales(bits, sym, min_zero):
    w = torch.zeros(6, 16)
    w[1] = 0.37  # constant positive
    w[2] = -2.5  # constant negative
    w[3] = 1e-42  # denormal: the range underflows a float32 step
    w[4, 3] = 5.0  # one spike
    scale, zero = fit_grid(w, bits, sym, min_zero=min_zero)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert int(zero.min()) >= min_zero and int(zero.max()) <= 2**bits - 1
    deq = dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
    assert torch.isfinite(deq).all()
    assert (deq[0] == 0).all() and (deq[5] == 0).all()
    if not sym:
        # The constant is an end of the asym range, hence on the grid.
        assert torch.allclose(deq[1], w[1], rtol=1e-6)
        assert torch.allclose(deq[2], w[2], rtol=1e-6)
        assert deq[4, 3] == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("min_zero", [0, 1])
def test_mse_search_never_worse_and_matches_float64_search(bits, sym, min_zero):
    norm, grid, max_shrink = 2.4, 100, 0.8
    w = random_rows(24, 64, seed=100 + bits)
    base_scale, base_zero = fit_grid(w, bits, sym, min_zero=min_zero)
    scale, zero = fit_grid(w, bits, sym, mse=True, min_zero=min_zero, mse_norm=norm, mse_grid=grid, mse_max_shrink=max_shrink)
    assert int(zero.min()) >= min_zero and (scale > 0).all()
    improved = 0
    for r in range(w.shape[0]):
        row = w[r].double().tolist()
        err_mse = row_error(row, reference_dequant(row, float(scale[r]), int(zero[r]), bits), norm)
        err_base = row_error(row, reference_dequant(row, float(base_scale[r]), int(base_zero[r]), bits), norm)
        assert err_mse <= err_base * (1 + 1e-5)
        improved += err_mse < err_base * (1 - 1e-3)
        ref_best = min(
            row_error(row, reference_dequant(row, *reference_params(row, bits, sym, min_zero, 1 - i / grid), bits), norm)
            for i in range(int(max_shrink * grid))
        )
        assert err_mse == pytest.approx(ref_best, rel=1e-4)
    if bits <= 4:
        assert improved > 0  # the heavy-tailed rows gain from clipping


def test_min_zero_pins_asym_zero_without_clipping_the_top():
    w = torch.rand(20, 48) + 0.05  # all positive: the free zero point would be 0
    free_scale, free_zero = fit_grid(w, 4, sym=False)
    assert (free_zero == 0).all()
    scale, zero = fit_grid(w, 4, sym=False, min_zero=1)
    assert (zero == 1).all()
    deq = dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], 4), scale[:, None], zero[:, None])
    assert ((w - deq).abs() <= scale[:, None] * 0.5 * (1 + 1e-5)).all()
    assert torch.allclose(deq.amax(dim=1), w.amax(dim=1), rtol=1e-6)


@pytest.mark.parametrize("group_size, groups", [(32, 4), (50, 2), (-1, 1), (200, 1)])
@pytest.mark.parametrize("sym", [True, False])
def test_group_grids_equal_per_group_fits(group_size, groups, sym):
    w = random_rows(12, 100, seed=5)
    scales, zeros = fit_group_grids(w, group_size, 3, sym, min_zero=1)
    assert scales.shape == zeros.shape == (groups, 12)
    width = 100 if group_size == -1 else group_size
    for g in range(groups):
        s, z = fit_grid(w[:, g * width : (g + 1) * width], 3, sym, min_zero=1)
        assert torch.equal(scales[g], s) and torch.equal(zeros[g], z)
    g_idx = natural_g_idx(100, group_size)
    assert g_idx.dtype == torch.int32
    assert g_idx.tolist() == [min(i // width, groups - 1) for i in range(100)]


def test_codes_are_clamped_to_the_bit_range():
    scale, zero = torch.tensor([0.1]), torch.tensor([8], dtype=torch.int32)
    codes = quantize_codes(torch.tensor([[-10.0, -0.8, 0.0, 0.7, 10.0]]), scale[:, None], zero[:, None], 4)
    assert codes.tolist() == [[0, 0, 8, 15, 15]]


def test_unsupported_bits_are_rejected():
    with pytest.raises(QtoolError):
        fit_grid(torch.randn(2, 8), 5, sym=True)


def test_group_sizes_follow_the_gptq_format_rule():
    weight = torch.randn(4, 32)
    for group_size in (-1, 1, 8, 32):  # any size GPTQ stores (the config's floor of 16 is the validator's)
        check_grid_options(weight, 4, group_size, 0)
    for group_size in (0, -2):
        with pytest.raises(QtoolError, match=f"group_size {group_size} is not valid"):
            check_grid_options(weight, 4, group_size, 0)
