"""One linear between GPTQ and EXL2: which paths keep every weight value (checked against the dequantized
source in float64), what the lossy ones cost, and the refusals."""

import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import Exl2Weight, exl2_scales, exl2_tensors_from_weight
from qtool.convert.exl2_gptq import aligned_group_size, exl2_from_gptq, fit_exl2_scales, gptq_from_exl2, nearest_gptq_bits
from qtool.formats.gptq import gptq_tensors_from_quantized, quantized_from_gptq_tensors
from qtool.quant.rtn import rtn_quantize
from qtool.formats.quantized_weight import QuantizedWeight


def random_exl2(in_features, out_features, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.cat([torch.randint(0, 1 << b, (r, out_features), generator=gen) for b, r in layout]).to(torch.int32)
    return Exl2Weight(
        codes=codes,
        qscale=torch.randint(1, 17, (len(layout), out_features), generator=gen, dtype=torch.int32),
        scale_max=(torch.rand(len(layout), generator=gen) * 0.1 + 0.01).half(),
        group_bits=tuple(b for b, _ in layout),
        group_sizes=tuple(r for _, r in layout),
        perm=torch.randperm(in_features, generator=gen),
    )


def f64(qw_or_w):
    return qw_or_w.dequantize(torch.float32).double()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout_name", ["uniform", "two groups"])
def test_exl2_to_gptq_is_exact_at_its_own_width(bits, layout_name):
    layout = [(bits, 96)] if layout_name == "uniform" else [(bits, 64), (bits, 32)]
    w = random_exl2(96, 64, layout, seed=bits)
    qw, report = gptq_from_exl2(w, bits, 32)
    assert report.exact and report.rel_error == 0.0
    assert torch.equal(f64(qw), f64(w))
    # and the GPTQ tensors hold it: pack, unpack, compare
    back = quantized_from_gptq_tensors(gptq_tensors_from_quantized(qw), bits, 32)
    assert torch.equal(f64(back), f64(w))


def test_narrow_groups_embed_exactly_in_a_wider_gptq_width():
    w = random_exl2(224, 32, [(8, 32), (6, 32), (5, 64), (4, 32), (3, 32), (2, 32)], seed=5)
    qw, report = gptq_from_exl2(w, 8, 32)
    assert report.exact
    assert torch.equal(f64(qw), f64(w))


def test_wider_groups_round_to_the_nested_grid():
    w = random_exl2(128, 64, [(6, 64), (4, 64)], seed=6)
    qw, report = gptq_from_exl2(w, 4, 64)
    assert not report.exact and "6-bit groups rounded to 4 bits" in report.note
    ref, got = f64(w), f64(qw)
    rows_6bit = w.perm[:64]
    # the 4-bit rows are untouched
    assert torch.equal(got[:, w.perm[64:]], ref[:, w.perm[64:]])
    # the 6-bit rows move by at most half the new step (4x the old one), except codes clipped at the top
    step = (w.scales()[0].double() * 4)[:, None]
    moved = (got[:, rows_6bit] - ref[:, rows_6bit]).abs()
    top = w.codes[:64].T >= 32 + 30  # 6-bit values above the 4-bit grid's largest point (7 * 4 = 28 old steps)
    assert bool((moved[~top] <= step.expand_as(moved)[~top] / 2 + 1e-12).all())
    expected_rel = float((got - ref).norm() / ref.norm())
    assert math.isclose(report.rel_error, expected_rel, rel_tol=1e-9)


def test_act_order_survives_as_g_idx():
    w = random_exl2(128, 32, [(4, 128)], seed=7)
    qw, _ = gptq_from_exl2(w, 4, 32)
    # rows stored together share a GPTQ group: g_idx follows the EXL2 permutation
    assert torch.equal(qw.g_idx[w.perm].long(), torch.arange(128) // 32)


def test_group_size_must_cut_exl2_groups():
    w = random_exl2(128, 32, [(4, 64), (3, 64)], seed=8)
    with pytest.raises(QtoolError, match="does not cut the EXL2 groups"):
        gptq_from_exl2(w, 4, 128)
    with pytest.raises(QtoolError, match="5-bit GPTQ"):
        gptq_from_exl2(w, 5, 64)
    assert aligned_group_size({"a": w, "b": random_exl2(96, 32, [(4, 96)], seed=1)}) == 32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_from_exl2_back_to_exl2_is_exact(bits, act_order):
    """A GPTQ model whose scales lie on EXL2's grid (one converted from EXL2) converts back without loss."""
    w = random_exl2(128, 48, [(bits, 128)], seed=10 + bits)
    if not act_order:
        w.perm = torch.arange(128)
    qw, _ = gptq_from_exl2(w, bits, 32)
    again, report = exl2_from_gptq(qw)
    assert report.exact
    assert torch.equal(f64(again), f64(w))


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 64), (2, 128), (8, -1)])
def test_general_gptq_to_exl2_keeps_widths_and_bounds_the_error(bits, group_size):
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(64, 128, generator=gen) * 0.05
    qw = rtn_quantize(weight, bits, group_size, sym=True).quantized
    w, report = exl2_from_gptq(qw)
    assert set(w.group_bits) <= set(range(2, bits + 1))  # a symmetric group never needs more bits
    ref, got = f64(qw), f64(w)
    # each column of each group: scale within a factor (17/16)**2 of the GPTQ one, values re-rounded to the
    # new grid, so no weight moves by more than half its new step plus the scale error on the largest code
    assert report.rel_error == pytest.approx(float((got - ref).norm() / ref.norm()), rel=1e-9)
    assert report.rel_error < 0.1
    assert not report.exact and "scale grid" in report.note


def test_asymmetric_gptq_takes_one_more_bit_exactly():
    """code - zero of 4-bit asym spans -15..15: 5-bit EXL2 holds it; with scales on EXL2's grid nothing changes."""
    gen = torch.Generator().manual_seed(3)
    levels = torch.randint(1, 17, (2, 32), generator=gen)
    levels[:, 0] = 16
    scales = exl2_scales(levels, torch.tensor([0.02, 0.05]).half()).float()
    qw = QuantizedWeight(
        codes=torch.randint(0, 16, (32, 64), generator=gen, dtype=torch.int32),
        scales=scales,
        zeros=torch.randint(0, 16, (2, 32), generator=gen, dtype=torch.int32),
        g_idx=torch.arange(64, dtype=torch.int32) // 32,
        bits=4,
        group_size=32,
    )
    w, report = exl2_from_gptq(qw)
    assert w.group_bits == (5, 5)
    assert report.exact
    assert torch.equal(f64(w), f64(qw))


def test_eight_bit_asymmetric_extremes_are_refused():
    qw = QuantizedWeight(
        codes=torch.zeros(32, 32, dtype=torch.int32).index_fill_(1, torch.tensor([3]), 255),
        scales=torch.full((1, 32), 0.01),
        zeros=torch.zeros(1, 32, dtype=torch.int32),
        g_idx=torch.zeros(32, dtype=torch.int32),
        bits=8,
        group_size=-1,
    )
    with pytest.raises(QtoolError, match="beyond 8-bit EXL2"):
        exl2_from_gptq(qw)


def test_groups_exl2_cannot_hold_are_refused():
    qw = rtn_quantize(torch.randn(32, 96), 4, 48, sym=True).quantized
    with pytest.raises(QtoolError, match="holds 48 rows"):
        exl2_from_gptq(qw)


def test_exl2_output_groups_sorted_widest_first():
    gen = torch.Generator().manual_seed(1)
    qw = rtn_quantize(torch.randn(32, 128, generator=gen), 4, 32, sym=True).quantized
    qw.codes[:, 64:96] = qw.codes[:, 64:96].clamp(6, 9)  # group 2 fits in 2 bits
    w, _ = exl2_from_gptq(qw)
    assert list(w.group_bits) == sorted(w.group_bits, reverse=True) and w.group_bits[-1] == 2
    exl2_tensors_from_weight(w)  # a layout ExLlamaV2 loads


@pytest.mark.parametrize("scale_max, top_level", [(0.0371, 16), (0.0371, 13), (0.0011, 16), (0.0011, 9), (3.5, 11)])
def test_scale_fit_reproduces_scales_on_the_grid(scale_max, top_level):
    """Also when no column uses the top level (the grid's unit must be found from a lower one) and when
    q_scale_max / 256 is subnormal in float16."""
    gen = torch.Generator().manual_seed(2)
    scale_max = torch.tensor([scale_max]).half()
    levels = torch.randint(1, top_level + 1, (20,), generator=gen)
    levels[0] = top_level
    scales = exl2_scales(levels[None], scale_max)[0].float()
    values = torch.randint(-8, 8, (20, 32), generator=gen).float() * scales[:, None]
    got_levels, got_max, codes = fit_exl2_scales(values, scales, 4)
    assert torch.equal(exl2_scales(got_levels[None], got_max.reshape(1))[0].float(), scales)
    assert torch.equal((codes - 8).float() * scales[:, None], values)


def test_nearest_width():
    assert [nearest_gptq_bits(b) for b in (2.2, 2.5, 3.4, 3.5, 5.0, 6.0, 7.9)] == [2, 3, 3, 4, 4, 8, 8]
