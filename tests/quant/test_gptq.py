"""gptq_quantize against a plain, unblocked float64 GPTQ written here (column by column, OBS update with the
row of the inverse Hessian's Cholesky factor), and properties on correlated inputs: it beats RTN, act order,
static groups, partial groups, dead inputs, damping recovery."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.quant.gptq import gptq_quantize
from qtool.quant.rtn import rtn_quantize

BITS = (2, 3, 4, 8)


# ---- float64 reference ------------------------------------------------------------------------------------------


def reference_grid(w: torch.Tensor, bits: int, sym: bool, min_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min/max grid per row of w [rows, cols], float64: (scale [rows], zero [rows])."""
    maxq = 2**bits - 1
    lo = w.min(dim=1).values.clamp(max=0.0)
    hi = w.max(dim=1).values.clamp(min=0.0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = lo == hi
    lo[empty], hi[empty] = -1.0, 1.0
    if sym:
        return 2 * hi / maxq, torch.full_like(hi, 2.0 ** (bits - 1))
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    pinned = zero < min_zero
    scale[pinned] = hi[pinned] / (maxq - min_zero)
    return scale, zero.clamp(min_zero, maxq)


def reference_gptq(weight, hessian, bits, group_size, sym, desc_act, static_groups, damp, min_zero):
    """Textbook GPTQ in float64, one column at a time. Returns codes, dequantized, g_idx, the loss of each row, and
    `after_tie` [rows, cols]: True from the first column (in solve order) where a row's value sat on a rounding
    tie. A tie can fall either way in float32 (sym puts every group's -absmax on one when it is fitted from the
    column being quantized), and the error feedback then sends the row elsewhere: both outcomes are GPTQ."""
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    maxq = 2**bits - 1
    width = cols if group_size == -1 else group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = [reference_grid(w[:, s : s + width], bits, sym, min_zero) for s in range(0, cols, width)]
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if desc_act else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    deq = torch.zeros(rows, cols, dtype=torch.float64)
    after_tie = torch.zeros(rows, cols, dtype=torch.bool)
    tied = torch.zeros(rows, dtype=torch.bool)
    g_idx = torch.zeros(cols, dtype=torch.int64)
    row_loss = torch.zeros(rows, dtype=torch.float64)
    for j in range(cols):
        if static_groups:
            group = int(order[j]) // width
            scale, zero = static[group]
        elif j % width == 0:
            group = j // width
            scale, zero = reference_grid(w[:, j : j + width], bits, sym, min_zero)
        steps = w[:, j] / scale
        q = torch.clamp(torch.round(steps) + zero, 0, maxq)
        other = torch.clamp(torch.where(q - zero > steps, q - 1, q + 1), 0, maxq)
        tied |= ((steps - torch.floor(steps) - 0.5).abs() < 1e-5) & (other != q)
        after_tie[:, j] = tied
        codes[:, j], deq[:, j], g_idx[j] = q, scale * (q - zero), group
        err = (w[:, j] - deq[:, j]) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
        row_loss += 0.5 * err.square()
    inverse = torch.argsort(order)
    return codes[:, inverse], deq[:, inverse], g_idx[inverse], row_loss, after_tie[:, inverse]


# ---- inputs -----------------------------------------------------------------------------------------------------


def correlated_problem(rows: int, cols: int, seed: int, tokens: int = 512):
    """W and H = 2/n X^T X with X = Z A: mixed features of uneven scale, so H is far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / math.sqrt(cols) + 0.5 * torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mix * (0.2 + torch.rand(cols, generator=gen) * 2)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    return weight, 2.0 * x.T @ x / tokens


def quadratic_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = (weight - dequantized).double()
    return float(torch.einsum("nk,kl,nl->", delta, hessian.double(), delta))


def assert_well_formed(result, rows: int, cols: int, bits: int, groups: int):
    q = result.quantized
    assert q.codes.shape == (rows, cols) and q.codes.dtype == torch.uint8
    assert q.scales.shape == (groups, rows) and q.scales.dtype == torch.float32
    assert q.zeros.shape == (groups, rows) and q.zeros.dtype == torch.int32
    assert q.g_idx.shape == (cols,) and q.g_idx.dtype == torch.int32
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    assert int(q.zeros.min()) >= 0 and int(q.zeros.max()) <= 2**bits - 1
    assert (q.scales > 0).all() and torch.isfinite(q.scales).all()
    assert int(q.g_idx.min()) >= 0 and int(q.g_idx.max()) == groups - 1
    assert result.dequantized.dtype == torch.float32
    assert torch.equal(q.dequantize(), result.dequantized)


# ---- against the reference --------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # bits, group_size, sym, desc_act, static_groups, min_zero, block_size
    (4, 32, True, False, False, 0, 32),
    (4, 32, False, True, False, 1, 32),
    (3, 40, True, True, False, 0, 32),  # groups start inside blocks; partial last group
    (3, 40, False, False, False, 0, 5),
    (2, -1, False, False, False, 0, 32),
    (2, 24, True, True, True, 0, 32),
    (8, 64, False, True, True, 0, 1),
    (8, -1, True, True, False, 0, 32),
    (4, 50, False, True, True, 1, 128),  # one block wider than the weight
    (4, 16, False, True, False, 0, 7),
]


@pytest.mark.parametrize("bits, group_size, sym, desc_act, static_groups, min_zero, block_size", REFERENCE_CASES)
def test_blocked_solver_matches_unblocked_float64_reference(bits, group_size, sym, desc_act, static_groups, min_zero, block_size):
    rows, cols = 40, 96
    weight, hessian = correlated_problem(rows, cols, seed=bits * 100 + max(group_size, 0))
    hessian[7, :] = hessian[:, 7] = 0.0  # one dead input
    result = gptq_quantize(
        weight, hessian, bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
        damp_percent=0.01, min_zero=min_zero, block_size=block_size,
    )
    codes, deq, g_idx, row_loss, after_tie = reference_gptq(
        weight, hessian, bits, group_size, sym, desc_act, static_groups, 0.01, min_zero
    )
    groups = 1 if group_size == -1 else math.ceil(cols / group_size)
    assert_well_formed(result, rows, cols, bits, groups)
    assert result.quantized.g_idx.tolist() == g_idx.tolist()
    assert result.damp_percent == 0.01
    assert after_tie.double().mean() < 0.1  # ties are rare: the comparison below covers most of the weight
    got_codes = result.quantized.codes.double()
    # Up to a row's first tie, everything agrees; rows with no tie agree to the end.
    assert (got_codes == codes)[~after_tie].double().mean() > 0.999
    clean = ~after_tie
    assert torch.allclose(result.dequantized.double()[clean], deq[clean], rtol=1e-4, atol=1e-7)
    dead = hessian.diagonal() == 0
    damped = hessian.double().clone()
    damped[dead, dead] = 1.0  # the solver's unit pivot for dead inputs, which the mean damping sees
    damped += 0.01 * damped.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    delta = weight.double() - result.dequantized.double()
    delta[:, dead] = 0.0
    got_row_loss = 0.5 * torch.einsum("nk,kl,nl->n", delta, damped, delta)
    untied = ~after_tie.any(dim=1)
    assert torch.allclose(got_row_loss[untied], row_loss[untied], rtol=1e-4)
    if bool(untied.all()):
        assert result.error == pytest.approx(float(row_loss.sum()), rel=1e-4)


@pytest.mark.parametrize("bits, group_size, sym, desc_act, static_groups, min_zero, block_size", REFERENCE_CASES)
def test_the_kernel_block_path_matches_the_column_loop(monkeypatch, bits, group_size, sym, desc_act, static_groups,
                                                       min_zero, block_size):
    """On a GPU each block's columns go through solve_row_block (one kernel; with static groups under act order on
    a grid per column); here the same path runs its torch reference: the codes and the error agree with the column
    loop's up to float32 summation order."""
    import qtool.quant.gptq as gptq_module
    from tests.helpers.row_blocks import force_row_blocks

    weight, hessian = correlated_problem(40, 96, seed=bits * 100 + max(group_size, 0))
    options = dict(group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups, min_zero=min_zero,
                   block_size=block_size)
    loop = gptq_quantize(weight, hessian, bits, **options)
    calls = force_row_blocks(monkeypatch, gptq_module)
    blocks = gptq_quantize(weight, hessian, bits, **options)
    assert sum(calls) == 96, "every column went through a block"
    assert (blocks.quantized.codes == loop.quantized.codes).double().mean() > 0.99
    assert torch.equal(blocks.quantized.dequantize(), blocks.dequantized)
    assert blocks.error == pytest.approx(loop.error, rel=1e-3)


@pytest.mark.parametrize("bits", BITS)
def test_reported_error_is_half_the_damped_quadratic_error(bits):
    weight, hessian = correlated_problem(32, 64, seed=bits)
    result = gptq_quantize(weight, hessian, bits, group_size=32, sym=False, desc_act=True, damp_percent=0.05)
    damped = hessian.double() + 0.05 * hessian.diagonal().double().mean() * torch.eye(64, dtype=torch.float64)
    assert result.error == pytest.approx(0.5 * quadratic_error(weight, result.dequantized, damped), rel=1e-3)


# ---- properties -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym, desc_act, mse", [(True, False, False), (False, True, False), (True, True, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, sym, desc_act, mse):
    weight, hessian = correlated_problem(64, 128, seed=10 + bits)
    gptq = gptq_quantize(weight, hessian, bits, group_size=32, sym=sym, desc_act=desc_act, mse=mse)
    rtn = rtn_quantize(weight, bits, group_size=32, sym=sym, mse=mse)
    assert_well_formed(gptq, 64, 128, bits, 4)
    assert quadratic_error(weight, gptq.dequantized, hessian) < 0.9 * quadratic_error(weight, rtn.dequantized, hessian)


def test_act_order_groups_follow_descending_hessian_diagonal():
    weight, hessian = correlated_problem(16, 100, seed=4)
    result = gptq_quantize(weight, hessian, 4, group_size=32, desc_act=True)
    assert_well_formed(result, 16, 100, 4, 4)
    order = torch.argsort(hessian.diagonal(), descending=True)
    by_importance = result.quantized.g_idx[order].tolist()
    assert by_importance == [p // 32 for p in range(100)]
    assert result.quantized.g_idx.tolist() != [i // 32 for i in range(100)]


def test_static_groups_keep_natural_g_idx_and_up_front_grids():
    weight, hessian = correlated_problem(16, 96, seed=5)
    result = gptq_quantize(weight, hessian, 3, group_size=32, sym=False, desc_act=True, static_groups=True)
    assert_well_formed(result, 16, 96, 3, 3)
    assert result.quantized.g_idx.tolist() == [i // 32 for i in range(96)]
    for g in range(3):
        scale, zero = reference_grid(weight[:, g * 32 : (g + 1) * 32].double(), 3, False, 0)
        assert torch.allclose(result.quantized.scales[g].double(), scale, rtol=1e-5)
        assert torch.equal(result.quantized.zeros[g].double(), zero)


def test_partial_last_group():
    weight, hessian = correlated_problem(24, 160, seed=6)
    for desc_act in (False, True):
        result = gptq_quantize(weight, hessian, 4, group_size=64, desc_act=desc_act)
        assert_well_formed(result, 24, 160, 4, 3)
        assert torch.bincount(result.quantized.g_idx.long()).tolist() == [64, 64, 32]


def test_one_group_per_row():
    weight, hessian = correlated_problem(24, 72, seed=7)
    result = gptq_quantize(weight, hessian, 4, group_size=-1, desc_act=True)
    assert_well_formed(result, 24, 72, 4, 1)
    assert result.quantized.group_size == -1 and (result.quantized.g_idx == 0).all()


def test_dead_inputs_get_zero_weights_and_inputs_stay_untouched():
    weight, hessian = correlated_problem(16, 64, seed=8)
    dead = [3, 17, 40]
    hessian[dead, :] = 0.0
    hessian[:, dead] = 0.0
    weight_before, hessian_before = weight.clone(), hessian.clone()
    result = gptq_quantize(weight, hessian, 4, group_size=32, sym=False, desc_act=True)
    assert_well_formed(result, 16, 64, 4, 2)
    assert (result.dequantized[:, dead] == 0).all()
    assert torch.equal(weight, weight_before) and torch.equal(hessian, hessian_before)


def test_min_zero_keeps_asym_zero_points_off_zero():
    weight, hessian = correlated_problem(32, 64, seed=9)
    weight = weight.abs()  # all positive: free zero points would be 0
    result = gptq_quantize(weight, hessian, 4, group_size=32, sym=False, min_zero=1)
    assert_well_formed(result, 32, 64, 4, 2)
    assert int(result.quantized.zeros.min()) >= 1


def test_singular_hessian_raises_damp_and_succeeds(caplog):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(20, 64, generator=gen)  # 20 tokens for 64 features: rank 20
    hessian = 2.0 * x.T @ x / 20
    assert int(torch.linalg.cholesky_ex(hessian)[1]) > 0  # undamped, it does not factor
    weight = torch.randn(16, 64, generator=gen)
    with caplog.at_level(logging.INFO, logger="qtool.quant.gptq"):
        result = gptq_quantize(weight, hessian, 4, group_size=32, damp_percent=0.0, damp_auto_increment=0.0025)
    assert result.damp_percent > 0
    assert any("damp" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert_well_formed(result, 16, 64, 4, 2)


def test_indefinite_hessian_takes_as_many_raises_as_it_needs(caplog):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 48, generator=gen)
    psd = 2.0 * x.T @ x / 16
    # H = S - a*mean(diag S)*I has eigenvalue -a*mean(diag S); damp d cures it once d*(1-a) > a, i.e. d > 0.0048.
    a = 0.0048 / 1.0048
    hessian = psd - a * psd.diagonal().mean() * torch.eye(48)
    with caplog.at_level(logging.INFO, logger="qtool.quant.gptq"):
        result = gptq_quantize(torch.randn(8, 48, generator=gen), hessian, 4, group_size=16, damp_percent=0.001, damp_auto_increment=0.0025)
    assert result.damp_percent == pytest.approx(0.006)  # 0.001 and 0.0035 fail
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 2


def test_hopeless_hessian_gives_up_with_qtool_error(caplog):
    hessian = -torch.eye(32) + 0.01 * torch.ones(32, 32)
    with caplog.at_level(logging.INFO, logger="qtool.quant.gptq"), pytest.raises(QtoolError):
        gptq_quantize(torch.randn(4, 32), hessian, 4, group_size=16, damp_percent=0.01, damp_auto_increment=0.02)
    # Tries 0.01, 0.03, ..., 0.99: the damp stays below 1.
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 49
    psd = torch.eye(32)
    psd[0, 0] = -1e-3
    with pytest.raises(QtoolError):  # no auto increment: the first failure is final
        gptq_quantize(torch.randn(4, 32), psd, 4, group_size=16, damp_percent=0.0, damp_auto_increment=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(bits=5), dict(group_size=0), dict(block_size=0), dict(damp_percent=1.5), dict(min_zero=15)],
)
def test_bad_options_are_rejected(kwargs):
    weight, hessian = correlated_problem(4, 32, seed=0)
    options = dict(bits=4, group_size=16) | kwargs
    with pytest.raises(QtoolError):
        gptq_quantize(weight, hessian, **options)


def test_bad_inputs_are_rejected():
    weight, hessian = correlated_problem(4, 32, seed=0)
    with pytest.raises(QtoolError):
        gptq_quantize(weight, hessian[:16, :16], 4)
    with pytest.raises(QtoolError):
        gptq_quantize(weight, torch.zeros(32, 32), 4)  # no calibration token
    hessian[0, 0] = float("nan")
    with pytest.raises(QtoolError):
        gptq_quantize(weight, hessian, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "kwargs, tolerance",
    [
        (dict(sym=False), 1e-3),
        (dict(desc_act=True, sym=False, mse=True), 1e-3),
        (dict(desc_act=True, static_groups=True, sym=False), 1e-3),
        (dict(desc_act=True, static_groups=True), 1e-2),  # sym ties may split the other way on the GPU
    ],
)
def test_cuda_matches_cpu(kwargs, tolerance):
    weight, hessian = correlated_problem(64, 256, seed=13)
    cpu = gptq_quantize(weight, hessian, 4, group_size=64, **kwargs)
    gpu = gptq_quantize(weight.cuda(), hessian.cuda(), 4, group_size=64, **kwargs)
    assert gpu.dequantized.device.type == "cuda" and gpu.quantized.codes.device.type == "cuda"
    assert torch.equal(gpu.quantized.dequantize(), gpu.dequantized)
    assert (gpu.quantized.codes.cpu() == cpu.quantized.codes).double().mean() > 0.98
    assert torch.equal(gpu.quantized.g_idx.cpu(), cpu.quantized.g_idx)
    assert gpu.error == pytest.approx(cpu.error, rel=tolerance)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_solve_holds_at_most_three_hessian_sized_matrices_beside_h():
    """The solve's GPU peak beyond its inputs: a working copy of H, the damped copy (turned into L^-1 in place) and
    L, then L^-1 and its flip: three [k, k] float32 matrices, plus the weight's few [rows, k] copies (the memory
    estimate's HESSIAN_COPIES = 4 counts H itself). Before the in-place solve it was five."""
    k, rows = 4096, 64
    weight, hessian = correlated_problem(rows, k, seed=29)
    weight, hessian = weight.cuda(), hessian.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gptq_quantize(weight, hessian, 4, group_size=128, sym=False)
    torch.cuda.synchronize()
    unit = k * k * 4
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 3 * unit + 8 * rows * k * 4, f"{extra / unit:.2f} [k, k] matrices"
