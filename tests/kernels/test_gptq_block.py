"""One lazy block of a GPTQ pass as one Triton kernel (kernels/gptq_block_triton.py) against its torch reference
(gptq_block_ref.solve_row_block_ref) on fresh random blocks: every EXL2 width side by side in one block, odd row
and column counts, zero-scale columns, ties at half a step; and the reference against a float64 GPTQ written
out here. On a CPU the kernel runs under the Triton interpreter; on a GPU the same tests run it compiled."""

import pytest
import torch
from kernel_env import DEVICE

from qtool.kernels.gptq_block_ref import solve_row_block_ref
from qtool.kernels.gptq_block_triton import solve_row_block, solve_row_block_triton


def random_block(seed: int, rows: int, columns: int):
    """w [rows, columns], per-column grids of widths 2..8 bits, centred (EXL2) in the even columns and with a zero
    point in [0, maxq] (GPTQ) in the odd ones, some columns with a zero scale (divisor 1), and the upper Cholesky
    factor of a random SPD inverse Hessian's block."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(2, 9, (columns,), generator=gen)
    bits[4 % columns] = 4
    zero = (2.0 ** (bits - 1)).float()
    scale = torch.rand(columns, generator=gen) * 0.1 + 0.01
    scale[::17] = 0.0
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    w = torch.randn(rows, columns, generator=gen) * 0.5
    w[0, 4 % columns] = 2.5 * scale[4 % columns]  # a tie at half a step in a centred 4-bit column: halves to even
    maxq = 2.0**bits - 1
    asymmetric = torch.arange(columns) % 2 == 1
    zero_point = torch.where(asymmetric, torch.floor(torch.rand(columns, generator=gen) * maxq), 0.0)
    low = torch.where(asymmetric, 0.0, -zero)
    high = torch.where(asymmetric, maxq, zero - 1)
    mix = torch.randn(rows, rows, generator=gen, dtype=torch.float64)
    inverse = torch.linalg.inv(mix @ mix.T / rows + torch.eye(rows, dtype=torch.float64))
    upper = torch.linalg.cholesky(inverse, upper=True).float()
    return w, divisor, scale, zero_point, low, high, upper


def gptq_float64(w, divisor, scale, zero, low, high, upper, per_row=False):
    """The block's GPTQ written out in float64 (the float32 roundings aside, what both must compute); per_row:
    divisor, scale and zero hold a grid per row."""
    w = w.double().clone()
    dequantized, errors = torch.empty_like(w), torch.empty_like(w)
    for i in range(w.shape[0]):
        d, s, z = (divisor[i], scale[i], zero[i]) if per_row else (divisor, scale, zero)
        codes = torch.clamp(torch.round(w[i].float() / d).double() + z.double(), low.double(), high.double())
        dequantized[i] = (codes - z.double()) * s.double()
        errors[i] = (w[i] - dequantized[i]) / upper[i, i].double()
        w[i + 1 :] -= upper[i, i + 1 :, None].double() * errors[i][None, :]
    return dequantized, errors


@pytest.mark.parametrize("rows,columns", [(32, 300), (17, 128), (1, 5), (64, 129)])
def test_the_block_kernel_equals_its_reference(kernels_can_run, rows, columns):
    block = random_block(rows * 1000 + columns, rows, columns)
    scale = block[2]
    expected = solve_row_block_ref(block[0].clone(), *block[1:])
    got = solve_row_block_triton(*(t.to(DEVICE) for t in block))
    for name, g, e in zip(("dequantized", "errors", "codes"), got, expected):
        g = g.cpu()
        # compiled, a fused multiply-add may round one feedback differently: a code then flips by one step
        same = torch.isclose(g, e, rtol=1e-5, atol=1e-6)
        assert same.float().mean() > 0.99, f"{name}: {int((~same).sum())} of {same.numel()} differ"
        if DEVICE == "cpu":
            assert same.all(), name
    if columns > 4:
        assert float(expected[2][0, 4]) == 2.0 and float(expected[0][0, 4] / scale[4]) == 2.0, "half a step: even code"


def per_row_grids(block, seed: int):
    """The block's per-column grid made a grid per row: each row scaled by its own factor, zero points shifted."""
    w, divisor, scale, zero, low, high, upper = block
    gen = torch.Generator().manual_seed(seed)
    factor = torch.rand(w.shape[0], 1, generator=gen) + 0.5
    scale_rows = scale[None, :] * factor
    divisor_rows = torch.where(scale_rows > 0, scale_rows, torch.ones_like(scale_rows))
    zero_rows = torch.clamp(zero[None, :] + torch.randint(-1, 2, (w.shape[0], 1), generator=gen), low, high)
    return w, divisor_rows, scale_rows, zero_rows, low, high, upper


@pytest.mark.parametrize("rows,columns", [(32, 300), (5, 7)])
def test_the_block_kernel_takes_a_grid_per_row(kernels_can_run, rows, columns):
    """GPTQ's static groups under act order: every row of the block (a weight column) on its own group's grid."""
    block = per_row_grids(random_block(rows * 7 + columns, rows, columns), seed=rows)
    expected = solve_row_block_ref(block[0].clone(), *block[1:])
    for g, e in zip(expected, gptq_float64(*block, per_row=True)):
        assert torch.isclose(g.double(), e, rtol=1e-4, atol=1e-5).float().mean() > 0.99
    got = solve_row_block_triton(*(t.to(DEVICE) for t in block))
    for name, g, e in zip(("dequantized", "errors", "codes"), got, expected):
        same = torch.isclose(g.cpu(), e, rtol=1e-5, atol=1e-6)
        assert same.float().mean() > 0.99, f"{name}: {int((~same).sum())} of {same.numel()} differ"
        if DEVICE == "cpu":
            assert same.all(), name
    # a grid per row is not the first row's grid for all: the rows' codes differ from a one-grid solve
    one_grid = solve_row_block_ref(block[0].clone(), block[1][0], block[2][0], block[3][0], *block[4:])
    assert not torch.equal(one_grid[2][1:], expected[2][1:])


def test_the_reference_is_gptq():
    block = random_block(7, 24, 64)
    got = solve_row_block_ref(block[0].clone(), *block[1:])
    expected = gptq_float64(*block)
    for g, e in zip(got, expected):
        same = torch.isclose(g.double(), e, rtol=1e-4, atol=1e-5)
        assert same.float().mean() > 0.99


def test_the_router_takes_the_reference_off_cuda():
    block = random_block(3, 8, 40)
    routed = solve_row_block(block[0].clone(), *block[1:])
    expected = solve_row_block_ref(block[0].clone(), *block[1:])
    for g, e in zip(routed, expected):
        assert torch.equal(g, e)


def test_a_solver_takes_the_kernel_for_any_number_of_rows(monkeypatch):
    """A solver asks blocks_problem about its whole [K, N] weight: solve_rows cuts it into blocks the kernel takes,
    so the row count must not send a GPU's solve to the per-row loop (as asking row_block_problem did: a 7B
    down_proj's 11008 rows). A CUDA float32 tensor is stood in for: this check reads only device, dtype and shape."""
    from types import SimpleNamespace

    import qtool.kernels.gptq_block_triton as block_module

    monkeypatch.setattr(block_module, "triton_device_problem", lambda device, interpreted: None)
    weight = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32, shape=(11008, 4096))
    assert block_module.blocks_problem(weight) is None
    assert "11008 rows" in block_module.row_block_problem(weight)
    assert "float32" in block_module.blocks_problem(SimpleNamespace(**{**vars(weight), "dtype": torch.float16}))
    assert "cpu" in block_module.blocks_problem(torch.zeros(3, 3))
