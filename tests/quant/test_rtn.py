"""rtn_quantize against a float64 round-to-nearest written here, group by group, for every bit width."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.quant.rtn import rtn_quantize


def reference_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int) -> torch.Tensor:
    """Dequantized weight by GPTQ's min/max grid on each group of consecutive columns, float64."""
    w = weight.double()
    maxq = 2**bits - 1
    width = w.shape[1] if group_size == -1 else group_size
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], width):
        block = w[:, start : start + width]
        lo = block.min(dim=1, keepdim=True).values.clamp(max=0.0)
        hi = block.max(dim=1, keepdim=True).values.clamp(min=0.0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        empty = lo == hi
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        if sym:
            scale, zero = 2 * hi / maxq, torch.full_like(hi, 2.0 ** (bits - 1))
        else:
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale)
            pinned = zero < min_zero
            scale = torch.where(pinned, hi / (maxq - min_zero), scale)
            zero = zero.clamp(min_zero, maxq)
        out[:, start : start + width] = scale * (torch.clamp(torch.round(block / scale) + zero, 0, maxq) - zero)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("sym, min_zero", [(True, 0), (False, 0), (False, 1)])
def test_rtn_matches_float64_reference(bits, group_size, sym, min_zero):
    gen = torch.Generator().manual_seed(bits + 7 * max(group_size, 0))
    rows, cols = 24, 112  # 112 = 2 * 48 + 16: a partial last group
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    weight[::5] = weight[::5].abs()  # rows whose free asym zero point is 0
    weight[3, 48:96] = 0.0  # an all-zero group
    result = rtn_quantize(weight, bits, group_size=group_size, sym=sym, min_zero=min_zero)
    groups = 1 if group_size == -1 else math.ceil(cols / group_size)
    q = result.quantized
    assert q.codes.shape == (rows, cols) and q.codes.dtype == torch.int32
    assert q.scales.shape == q.zeros.shape == (groups, rows)
    assert q.g_idx.tolist() == [0 if group_size == -1 else i // group_size for i in range(cols)]
    assert q.group_size == group_size and q.bits == bits
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    assert int(q.zeros.min()) >= min_zero
    assert torch.equal(q.dequantize(), result.dequantized)
    ref = reference_rtn(weight, bits, group_size, sym, min_zero)
    diff = (result.dequantized.double() - ref).abs()
    step = (q.scales[q.g_idx.long()].T).double()
    # Equal, except where float32 splits a rounding tie (sym puts -absmax on one): then one step apart.
    off = diff > 1e-2 * step
    assert off.double().mean() < 0.02
    assert torch.allclose(diff[off], step[off], rtol=1e-4)
    assert result.error == pytest.approx(float((weight.double() - result.dequantized.double()).square().sum()), rel=1e-5)
    assert result.damp_percent == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clipping_lowers_rtn_error_on_heavy_tails(bits):
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(64, 128, generator=gen) / torch.rand(64, 128, generator=gen).clamp_min(0.05) * 0.01
    plain = rtn_quantize(weight, bits, group_size=64, sym=False)
    clipped = rtn_quantize(weight, bits, group_size=64, sym=False, mse=True)
    assert torch.equal(clipped.quantized.dequantize(), clipped.dequantized)
    assert clipped.error < plain.error


def test_rtn_rejects_bad_options():
    with pytest.raises(QtoolError):
        rtn_quantize(torch.randn(4, 32), 4, group_size=0)
    with pytest.raises(QtoolError):
        rtn_quantize(torch.randn(4, 32), 6)
    with pytest.raises(QtoolError):
        rtn_quantize(torch.full((4, 32), float("nan")), 4)
