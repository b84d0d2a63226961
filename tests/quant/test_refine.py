"""Scale refinement: the refitted scales solve the per-row least-squares problem (checked in float64 with an
explicit design matrix), never raise a row's error, and keep codes, zeros and g_idx."""

from __future__ import annotations

import pytest
import torch

from qtool.quant.gptq import gptq_quantize
from qtool.quant.refine import REFINE_DAMP, refine_group_scales


def problem(n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=gen) @ torch.randn(k, k, generator=gen) / k**0.5
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=gen)
    return w, h


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = (w - q).double()
    return ((d @ h.double()) * d).sum(dim=1)


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(2, 32, False, False), (3, 40, True, True), (4, -1, False, False), (8, 64, True, False)])
def test_refined_scales_solve_the_row_least_squares(bits, group_size, sym, desc_act):
    w, h = problem(n=9, k=100, seed=bits)
    result = gptq_quantize(w, h, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, min_zero=0)
    refined, dequantized = refine_group_scales(w, result.quantized, h)
    q = result.quantized
    assert torch.equal(refined.codes, q.codes) and torch.equal(refined.zeros, q.zeros) and torch.equal(refined.g_idx, q.g_idx)
    assert torch.allclose(dequantized, refined.dequantize())
    damped = h.double().clone()
    damped.diagonal().add_(REFINE_DAMP * h.diagonal().double().mean())
    before, after = output_error(w, result.dequantized, damped), output_error(w, dequantized, damped)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < before.sum()
    # float64 reference: for each row, design matrix columns = (code - zero) restricted to one group
    g = q.g_idx.long()
    for row in range(w.shape[0]):
        p = (q.codes[row].double() - q.zeros.double()[g, row])
        design = torch.zeros(w.shape[1], q.num_groups, dtype=torch.float64)
        design[torch.arange(w.shape[1]), g] = p
        lhs = design.T @ damped @ design
        rhs = design.T @ damped @ w[row].double()
        expected = torch.linalg.solve(lhs, rhs)
        if after[row] < before[row] * (1 - 1e-6):  # the row took the refit
            assert torch.allclose(refined.scales[:, row].double(), expected, rtol=1e-3, atol=1e-5)


def test_rows_the_refit_would_not_help_keep_their_scales():
    w, h = problem(n=6, k=64, seed=11)
    result = gptq_quantize(w, h, bits=4, group_size=32, sym=True)
    refined, _ = refine_group_scales(w, result.quantized, h)
    again, _ = refine_group_scales(w, refined, h)
    # a second refit is a fixed point: the scales are already optimal for these codes
    assert torch.allclose(again.scales, refined.scales, rtol=1e-4, atol=1e-7)


def test_rows_refitted_a_slice_at_a_time_give_the_whole_weight_s_result(monkeypatch):
    """Rows are independent: slices of 4 rows (the last one shorter) give the scales of one refit over all 9."""
    from qtool.quant import refine

    w, h = problem(n=9, k=96, seed=5)
    result = gptq_quantize(w, h, bits=3, group_size=32, sym=False)
    whole, whole_deq = refine_group_scales(w, result.quantized, h)
    monkeypatch.setattr(refine, "REFINE_ROWS", 4)
    sliced, sliced_deq = refine_group_scales(w, result.quantized, h)
    assert torch.allclose(sliced.scales, whole.scales, rtol=1e-5, atol=1e-8)
    assert torch.allclose(sliced_deq, whole_deq, rtol=1e-5, atol=1e-7)
    assert not torch.equal(whole.scales, result.quantized.scales)  # the refit changed something to compare
