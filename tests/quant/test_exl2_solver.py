"""The EXL2 solver for one linear: its output is a valid EXL2 layer, its reported error is the quadratic form
computed here in float64, it reduces to round-to-nearest on the EXL2 grid when the Hessian is diagonal, and its
error feedback pays off on correlated inputs; the candidates' layouts and bit counts."""

import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import exl2_scales, exl2_tensors_from_weight, weight_from_exl2_tensors
from qtool.quant.exl2_solver import Exl2Candidate, exl2_quantize, fit_group_scales


def correlated(rows, cols, seed, tokens=512):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / math.sqrt(cols) + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mix * torch.linspace(0.3, 3.0, cols)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    return weight, 2 * x.T @ x / tokens


def quadratic(delta, hessian):
    return float(torch.einsum("nk,kl,nl->", delta.double(), hessian.double(), delta.double()))


@pytest.mark.parametrize("layout", [((4, 3, 3), (32, 64, 64)), ((8, 6, 5, 4, 3, 2), (32,) * 6), ((2,), (160,))])
def test_output_is_a_valid_layer_and_error_is_the_quadratic_form(layout):
    bits, sizes = layout
    weight, hessian = correlated(45, sum(sizes), seed=sum(bits))
    result = exl2_quantize(weight, hessian, bits, sizes)
    w = result.weight
    assert (w.group_bits, w.group_sizes) == (bits, sizes)
    back = weight_from_exl2_tensors(exl2_tensors_from_weight(w), 45)
    assert torch.equal(back.dequantize(), result.dequantized)
    expected = quadratic(result.dequantized - weight, hessian) / quadratic(weight, hessian)
    assert result.error == pytest.approx(expected, rel=1e-4)
    # act order: storage rows by descending Hessian diagonal
    diag = hessian.diagonal()[w.perm]
    assert bool((diag[:-1] >= diag[1:]).all())


def test_diagonal_hessian_is_round_to_nearest_on_the_grid():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 96, generator=gen) * 0.05
    hessian = torch.diag(torch.rand(96, generator=gen) + 0.5)
    result = exl2_quantize(weight, hessian, (4, 3), (32, 64), damp_percent=0.0)
    w = result.weight
    stored = weight.T[w.perm]  # [K, N] in storage order
    start = 0
    for g, (bits, rows) in enumerate(zip(w.group_bits, w.group_sizes)):
        x = stored[start : start + rows]
        levels, scale_max, scales = fit_group_scales(x, bits)
        assert torch.equal(levels, w.qscale[g]) and torch.equal(scale_max, w.scale_max[g])
        zero = 1 << (bits - 1)
        codes = torch.clamp(torch.round(x / scales.float()), -zero, zero - 1) + zero
        assert torch.equal(codes.to(torch.int32), w.codes[start : start + rows])
        start += rows


def test_error_feedback_beats_rounding_on_correlated_inputs():
    weight, hessian = correlated(64, 128, seed=3)
    gptq = exl2_quantize(weight, hessian, (4, 3), (64, 64))
    rtn = exl2_quantize(weight, torch.diag(hessian.diagonal()), (4, 3), (64, 64))
    rtn_error = quadratic(rtn.dequantized - weight, hessian) / quadratic(weight, hessian)
    assert gptq.error < 0.8 * rtn_error


def test_more_bits_less_error():
    weight, hessian = correlated(48, 128, seed=4)
    errors = [exl2_quantize(weight, hessian, (b,), (128,)).error for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_fit_group_scales_properties():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 30, generator=gen) * torch.rand(30, generator=gen)
    for bits in (2, 4, 8):
        levels, scale_max, scales = fit_group_scales(x, bits)
        assert int(levels.min()) >= 1 and int(levels.max()) <= 16 and scale_max.dtype == torch.float16
        assert torch.equal(scales, exl2_scales(levels[None], scale_max.reshape(1))[0])
        # the stretch p stays within [0.7, 1.2] of the largest natural scale
        top = float((x.abs().amax(0) + 1e-12).max() / (((1 << bits) - 1) / 2))
        assert 0.69 * top <= float(scale_max) <= 1.21 * top


def test_dead_inputs_and_bad_hessian():
    weight, hessian = correlated(32, 64, seed=6)
    hessian[5, :] = hessian[:, 5] = 0
    result = exl2_quantize(weight, hessian, (4,), (64,))
    assert bool((result.dequantized[:, 5] == 0).all())
    with pytest.raises(QtoolError, match="Hessian"):
        exl2_quantize(weight, hessian[:-1, :-1], (4,), (64,))
    with pytest.raises(QtoolError, match="7 bits"):
        exl2_quantize(weight, hessian, (7,), (64,))


@pytest.mark.parametrize(
    "candidate, in_features, expected",
    [
        (((4, 3), (0.1, 0.9), (128, 128)), 576, ((4, 3, 3, 3, 3), (128, 128, 128, 128, 64))),
        (((8, 4), (0.05, 0.95), (32, 128)), 576, ((8, 4, 4, 4, 4, 4), (32, 128, 128, 128, 128, 32))),
        (((4,), (1.0,), (128,)), 96, ((4,), (96,))),
    ],
)
def test_candidate_layout_rule(candidate, in_features, expected):
    """ceil(rows * share / group size) groups per width, the matrix's end cutting the last."""
    c = Exl2Candidate(*candidate)
    assert c.layout(in_features) == expected


def test_candidate_bits_match_the_stored_layer():
    weight, hessian = correlated(40, 192, seed=7)
    c = Exl2Candidate((5, 4, 3), (0.1, 0.3, 0.6), (32, 64, 64))
    bits, sizes = c.layout(192)
    w = exl2_quantize(weight, hessian, bits, sizes).weight
    assert c.total_bits(192, 40) == w.storage_bits()
    assert Exl2Candidate.from_dict(c.to_dict()) == c
    with pytest.raises(QtoolError):
        Exl2Candidate((3, 4), (0.5, 0.5), (32, 32))
    with pytest.raises(QtoolError):
        Exl2Candidate((4,), (0.9,), (32,))


@pytest.mark.parametrize("layout, improves", [(((4, 3, 3), (32, 64, 64)), True), (((3, 2), (96, 64)), True), (((6, 5), (64, 96)), False)])
def test_refit_keeps_codes_and_never_raises_the_error(layout, improves):
    """refine=True keeps the codes and refits q_scale levels (still 1..16) and possibly q_scale_max. The error,
    computed here in float64 with the damped Hessian the refit uses, is at most the unrefined one for the linear,
    and for every output when q_scale_max stayed; it drops on correlated inputs at low widths."""
    from qtool.quant.exl2_solver import REFINE_DAMP

    bits, sizes = layout
    weight, hessian = correlated(70, sum(sizes), seed=sum(sizes) + 1)
    plain = exl2_quantize(weight, hessian, bits, sizes)
    refined = exl2_quantize(weight, hessian, bits, sizes, refine=True)
    assert torch.equal(refined.weight.codes, plain.weight.codes)
    assert int(refined.weight.qscale.min()) >= 1 and int(refined.weight.qscale.max()) <= 16
    damped = hessian.double().clone()
    damped.diagonal().add_(REFINE_DAMP * damped.diagonal().mean())
    per_output = lambda delta: torch.einsum("nk,kl,nl->n", delta.double(), damped, delta.double())  # noqa: E731
    before, after = per_output(plain.dequantized - weight), per_output(refined.dequantized - weight)
    assert float(after.sum()) <= float(before.sum()) * (1 + 1e-6)
    if torch.equal(refined.weight.scale_max, plain.weight.scale_max):
        assert bool((after <= before * (1 + 1e-9)).all())
    assert refined.error <= plain.error * (1 + 1e-9)
    if improves:
        assert refined.error < plain.error and not torch.equal(refined.weight.qscale, plain.weight.qscale)


def test_grid_maxima_search_puts_a_common_optimum_on_the_grid():
    """When every output of a group wants the same scale c, the searched q_scale_max makes c a grid value (level 16
    with q_scale_max = c), where the old maximum 1.37c left it between levels."""
    from qtool.formats.exl2 import exl2_scales
    from qtool.quant.exl2_solver import _nearest_grid_maxima

    c = torch.tensor([0.013, 0.002])
    best = c[None].repeat(9, 1)
    chosen = _nearest_grid_maxima(best, torch.ones(9, 2), torch.ones(9, 1, dtype=torch.bool), (1.37 * c).to(torch.float16))
    levels = torch.full((2, 9), 16)
    on_grid = exl2_scales(levels, chosen).to(torch.float32)[:, 0]
    assert torch.allclose(on_grid, c, rtol=2e-3)
    old_grid = exl2_scales(torch.arange(1, 17)[:, None].repeat(1, 2).T.reshape(2, 16), (1.37 * c).to(torch.float16)).to(torch.float32)
    assert float((old_grid - c[:, None]).abs().min(dim=1).values.max() / c.min()) > 0.01


def test_an_all_zero_group_keeps_a_positive_q_scale_max_that_readers_accept():
    weight = torch.randn(32, 64) * 0.05
    weight[:, :32] = 0.0  # the first group of 32 input rows is all zero
    hessian = torch.eye(64)
    result = exl2_quantize(weight, hessian, group_bits=(4, 4), group_sizes=(32, 32), act_order=False).weight
    assert bool((result.scale_max > 0).all())
    loaded = weight_from_exl2_tensors(exl2_tensors_from_weight(result))  # the reader's checks pass
    assert bool((loaded.dequantize()[:, :32] == 0).all())


def test_fit_group_scales_batched_fits_each_group_on_its_own():
    from qtool.quant.exl2_solver import fit_group_scales_batched

    gen = torch.Generator().manual_seed(12)
    groups = torch.randn(5, 64, 24, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 0.2, 5.0]).view(5, 1, 1)
    groups[3] = 0.0  # an all-zero group among live ones
    for bits in (2, 4, 8):
        levels, maxima, scales = fit_group_scales_batched(groups, bits)
        for index, group in enumerate(groups):
            alone = fit_group_scales(group, bits)
            assert torch.equal(levels[index], alone[0]) and torch.equal(maxima[index], alone[1])
            assert torch.equal(scales[index], alone[2])


def test_fit_group_scales_batched_takes_a_width_per_group_and_zero_padded_rows():
    from qtool.quant.exl2_solver import fit_group_scales_batched

    gen = torch.Generator().manual_seed(13)
    widths, sizes = [2, 8, 4, 3], [32, 128, 64, 32]
    groups = [torch.randn(size, 20, generator=gen) * (index + 0.5) for index, size in enumerate(sizes)]
    padded = torch.zeros(len(groups), max(sizes), 20)
    for index, group in enumerate(groups):
        padded[index, : group.shape[0]] = group
    levels, maxima, scales = fit_group_scales_batched(padded, torch.tensor(widths))
    for index, (group, bits) in enumerate(zip(groups, widths)):
        alone = fit_group_scales(group, bits)
        assert torch.equal(levels[index], alone[0]) and torch.equal(maxima[index], alone[1]), (bits, index)
        assert torch.equal(scales[index], alone[2])


@pytest.mark.parametrize("in_features,out_features,batch_candidates", [(160, 40, 30), (96, 33, 4), (64, 8, 1)])
def test_candidate_errors_in_one_pass_equal_each_candidates_own_solve(in_features, out_features, batch_candidates):
    """The measurement's batched GPTQ pass (all candidates side by side, lazy updates every 32 rows) against
    exl2_quantize run for each candidate alone: the same errors up to float32 summation order, whether the
    candidates fit one pass or take several; dead inputs included."""
    from qtool.quant.exl2_optimize import DEFAULT_CANDIDATES
    from qtool.quant.exl2_solver import candidate_errors, prepare_linear

    weight, hessian = correlated(out_features, in_features, seed=in_features + out_features)
    hessian[:, 7] = hessian[7, :] = 0.0  # an input never seen
    prepared = prepare_linear(weight, hessian)
    layouts = [candidate.layout(in_features) for candidate in DEFAULT_CANDIDATES]
    per_pass = batch_candidates * 3 * in_features * out_features * 4
    errors = candidate_errors(prepared, weight, hessian, layouts, p_grid=24, batch_bytes=per_pass)
    alone = [exl2_quantize(weight, hessian, bits, sizes, p_grid=24, prepared=prepared).error for bits, sizes in layouts]
    assert len(errors) == len(layouts)
    torch.testing.assert_close(torch.tensor(errors, dtype=torch.float64), torch.tensor(alone, dtype=torch.float64),
                               rtol=1e-4, atol=1e-9)
    # equal layouts (small widths collapse several candidates) give equal errors, different ones differ
    assert len({f"{error:.5g}" for error in errors}) == len(set(layouts)), "each candidate solved with its own layout"


@pytest.mark.parametrize("layout", [((4, 3, 3), (32, 64, 64)), ((8, 6, 5, 4, 3, 2), (32,) * 6), ((2,), (160,))])
def test_the_kernel_block_path_matches_the_row_loop(monkeypatch, layout):
    """On a GPU each group's rows go through solve_row_block in sub-blocks (one kernel each); here the same path
    runs its torch reference: codes and error agree with the row loop's up to float32 summation order."""
    import qtool.quant.exl2_solver as solver
    from tests.helpers.row_blocks import force_row_blocks

    bits, sizes = layout
    weight, hessian = correlated(45, sum(sizes), seed=sum(bits) + 1)
    loop = exl2_quantize(weight, hessian, bits, sizes)
    calls = force_row_blocks(monkeypatch, solver)
    blocks = exl2_quantize(weight, hessian, bits, sizes)
    assert sum(calls) == sum(sizes), "every row went through a block"
    assert (blocks.weight.codes == loop.weight.codes).double().mean() > 0.99
    assert torch.equal(blocks.weight.dequantize(), blocks.dequantized)
    assert blocks.error == pytest.approx(loop.error, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_candidate_errors_on_the_gpu_match_the_cpu():
    """The batched measurement on a GPU (its row blocks through the Triton kernel, a batch sized from free memory)
    against the same pass on the CPU (the blocks' torch reference)."""
    from qtool.quant.exl2_optimize import DEFAULT_CANDIDATES
    from qtool.quant.exl2_solver import candidate_errors, prepare_linear

    weight, hessian = correlated(96, 256, seed=21)
    layouts = [candidate.layout(256) for candidate in DEFAULT_CANDIDATES]
    cpu = candidate_errors(prepare_linear(weight, hessian), weight, hessian, layouts, p_grid=24)
    gpu_weight, gpu_hessian = weight.cuda(), hessian.cuda()
    gpu = candidate_errors(prepare_linear(gpu_weight, gpu_hessian), gpu_weight, gpu_hessian, layouts, p_grid=24)
    torch.testing.assert_close(torch.tensor(gpu), torch.tensor(cpu), rtol=1e-3, atol=1e-8)
