"""The Triton GEMV (M = 1) and the compute-layout repack against y = x @ W^T + b in float64, W built from random
codes, scales and zeros packed here by an independent bit-stream packer: every bit width, act order, groups
that do not divide K, padded irregular groups, per-channel, sym/asym, v1/v2, fp16/bf16, split-K."""


import pytest
import torch
from gptq_reference import random_gptq_codes, reference, relative_error
from kernel_env import DEVICE


from qtool.kernels.gptq_gemv_triton import GemvConfig, gemv_tile_fits, gptq_gemv, unit_rows
from qtool.kernels.repack import repack_gptq
from qtool.kernels.triton_backend import TritonBackend
from qtool.kernels.linear_tensors import GptqLinearTensors

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
pytestmark = pytest.mark.usefixtures("kernels_can_run")


def random_gptq_layer(n, k, bits, group_size, act_order, asym, checkpoint_format, seed, irregular=False):
    """(codes [N,K], scales [G,N] f16, zeros [G,N], g_idx [K], GPTQ tensors dict, bias f16), on the CPU."""
    layer = random_gptq_codes(n, k, bits, group_size, act_order, asym, checkpoint_format, seed, irregular)
    tensors = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales, "g_idx": layer.g_idx}
    return layer.codes, layer.scales, layer.zeros, layer.g_idx, tensors, layer.bias


# (bits, group_size, act_order, asym, checkpoint format, irregular groups, dtype, split_k)
CASES = [
    (2, 64, True, True, "gptq", False, torch.float16, 3),
    (2, -1, False, False, "gptq_v2", False, torch.bfloat16, 1),
    (3, 64, True, True, "gptq_v2", False, torch.bfloat16, 3),
    (3, 32, False, False, "gptq", False, torch.float16, 1),
    (3, 48, True, True, "gptq", False, torch.float16, 3),  # 48 is no multiple of 32: padded groups
    (4, 64, True, True, "gptq", False, torch.bfloat16, 3),
    (4, 64, False, False, "gptq", False, torch.float16, 1),
    (4, -1, False, True, "gptq_v2", False, torch.float16, 3),
    (4, 32, True, True, "gptq_v2", True, torch.bfloat16, 3),
    (8, 64, True, True, "gptq_v2", False, torch.float16, 3),
    (8, -1, False, False, "gptq", False, torch.bfloat16, 1),
    (8, 32, False, True, "gptq", True, torch.float16, 3),
]


# every case in the compute layout the backend uses; the 4-bit ones also in plain order (fragment order off)
ORDERED_CASES = [case + (True,) for case in CASES] + [case + (False,) for case in CASES if case[0] == 4]


@pytest.mark.parametrize("denormal", [True, False], ids=["denormal", "mantissa"])
@pytest.mark.parametrize("bits,group_size,act_order,asym,fmt,irregular,dtype,split_k,fragment_order", ORDERED_CASES)
def test_gemv_matches_float64_reference(bits, group_size, act_order, asym, fmt, irregular, dtype, split_k,
                                        fragment_order, denormal):
    n, k = 96, 160
    seed = bits * 1000 + group_size * 10 + act_order
    codes, scales, zeros, g_idx, t, bias = random_gptq_layer(n, k, bits, group_size, act_order, asym, fmt, seed, irregular)
    weight = repack_gptq(*(t[name].to(DEVICE) for name in ("qweight", "qzeros", "scales", "g_idx")), bits, fmt,
                         bias.to(DEVICE), fragment_order=fragment_order)
    assert weight.fragment_order == (fragment_order and bits == 4)
    assert (weight.perm is not None) == (act_order or irregular or group_size == 48)
    assert (weight.zeros is not None) == asym
    units = 32 // unit_rows(bits)
    while not gemv_tile_fits(weight, units):
        units //= 2
    workspace = torch.zeros(n, device=DEVICE)
    counters = torch.zeros(n // 32, dtype=torch.int32, device=DEVICE)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    # prefetch (two tiles in flight) on every other case, so both loop forms are checked at each bit width
    config = GemvConfig(block_n=32, units=units, split_k=split_k, num_warps=1, row_sum_each_tile=act_order, prefetch=not asym,
                        denormal=denormal)
    gptq_gemv(x, weight, config, out, workspace, counters)
    assert torch.isfinite(out).all(), "an output element was not written"
    assert relative_error(out, reference(x, codes, scales, zeros, g_idx, bias)) < TOLERANCE[dtype]
    assert not workspace.any() and not counters.any(), "split-K left the workspace dirty"


def test_gemv_without_bias_uneven_tiles():
    """N not a multiple of the column block and K not a multiple of the K tile: masked edges; rows summed every
    tile."""
    n, k, bits = 160, 96, 4
    codes, scales, zeros, g_idx, t, _ = random_gptq_layer(n, k, bits, -1, False, True, "gptq_v2", seed=7)
    weight = repack_gptq(*(t[name].to(DEVICE) for name in ("qweight", "qzeros", "scales", "g_idx")), bits, "gptq_v2")
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(8)).half().to(DEVICE)
    out = torch.full((1, n), float("nan"), dtype=torch.float16, device=DEVICE)
    workspace, counters = torch.zeros(n, device=DEVICE), torch.zeros(8, dtype=torch.int32, device=DEVICE)
    config = GemvConfig(block_n=64, units=8, split_k=2, num_warps=2, row_sum_each_tile=True, prefetch=True)
    gptq_gemv(x, weight, config, out, workspace, counters)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference(x, codes, scales, zeros, g_idx, None)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("bits,group_size,act_order,m,dtype,row_sum,denormal,prefetch", [
    (4, 32, True, 2, torch.float16, True, True, False), (3, 64, False, 3, torch.bfloat16, False, True, False),
    (8, 64, True, 5, torch.bfloat16, True, False, False), (2, -1, False, 8, torch.float16, False, True, False),
    (4, 64, False, 4, torch.bfloat16, False, False, False),
    # M = 2 runs the 2-D kernel with a second set of accumulators: both unpackings, prefetch, 3-bit
    (3, 32, True, 2, torch.bfloat16, False, False, True), (8, -1, False, 2, torch.float16, True, True, True),
    (2, 64, False, 2, torch.bfloat16, False, True, True),
])
def test_gemv_several_rows(bits, group_size, act_order, m, dtype, row_sum, denormal, prefetch):
    """The GEMV for 2 <= M <= 8 (M = 2: the 2-D kernel with two accumulator sets; above, the 3-D kernel with rows
    padded to a power of two): every row against the float64 reference, split-K on, x with a row stride larger
    than K."""
    n, k = 96, 160
    codes, scales, zeros, g_idx, t, bias = random_gptq_layer(n, k, bits, group_size, act_order, True, "gptq", seed=50 + m)
    weight = repack_gptq(*(t[name].to(DEVICE) for name in ("qweight", "qzeros", "scales", "g_idx")), bits, "gptq", bias.to(DEVICE))
    units = 32 // unit_rows(bits)
    while not gemv_tile_fits(weight, units):
        units //= 2
    wide = torch.randn(m, k + 32, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    x = wide[:, :k]  # row stride k + 32
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    workspace, counters = torch.zeros(m * n, device=DEVICE), torch.zeros(8, dtype=torch.int32, device=DEVICE)
    config = GemvConfig(block_n=32, units=units, split_k=2, num_warps=1, row_sum_each_tile=row_sum, denormal=denormal,
                        prefetch=prefetch)
    gptq_gemv(x, weight, config, out, workspace, counters)
    assert torch.isfinite(out).all(), "an output element was not written"
    assert relative_error(out, reference(x, codes, scales, zeros, g_idx, bias)) < TOLERANCE[dtype]
    assert not workspace.any() and not counters.any(), "split-K left the workspace dirty"


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("magnitude", [1e-6, 3e4])
def test_denormal_codes_keep_precision_at_extreme_activations(bits, magnitude):
    """Codes read as subnormals times x scaled by up to 2^62: exact products for |x| from 1e-6 to 3e4 (bfloat16
    activations of that size occur in real models), so the error stays that of the float32 sum."""
    n, k = 64, 128
    codes, scales, zeros, g_idx, t, _ = random_gptq_layer(n, k, bits, 64, False, True, "gptq_v2", seed=90 + bits)
    weight = repack_gptq(*(t[name].to(DEVICE) for name in ("qweight", "qzeros", "scales", "g_idx")), bits, "gptq_v2")
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(bits)) * magnitude).to(torch.bfloat16).to(DEVICE)
    out = torch.empty((1, n), dtype=torch.float32, device=DEVICE)
    workspace, counters = torch.zeros(n, device=DEVICE), torch.zeros(4, dtype=torch.int32, device=DEVICE)
    config = GemvConfig(block_n=32, units=32 // unit_rows(bits), split_k=2, num_warps=1, denormal=True)
    gptq_gemv(x, weight, config, out, workspace, counters)
    assert relative_error(out, reference(x, codes, scales, zeros, g_idx, None)) < 1e-5


@pytest.mark.parametrize("fragment_order", [False, True])
def test_repack_sorts_groups_contiguous(fragment_order):
    """After the repack, compute row r belongs to group r // group_rows and reads input column perm[r]; packed
    position q holds compute row q, or in fragment order (code j of word c of a block of 32) row 8(j % 4) + 2c +
    j // 4 (written out here from the wgmma fragment it serves, not with the repack's own function)."""
    n, k, bits = 32, 160, 4
    codes, scales, zeros, g_idx, t, _ = random_gptq_layer(n, k, bits, 64, True, True, "gptq", seed=3)
    weight = repack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, "gptq", fragment_order=fragment_order)
    perm = weight.perm.long()
    assert sorted(perm.tolist()) == list(range(k))
    assert torch.equal(g_idx[perm].long(), torch.arange(k) // weight.group_rows)
    assert weight.group_rows == 64 and weight.k_rows == k and weight.fragment_order == fragment_order
    shifts = torch.arange(0, 32, bits)
    unpacked = ((weight.qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(k, n)
    rows = list(range(k))
    if fragment_order:
        # word c of each block of 32 holds rows 2c + 8i (codes i = 0..3) and 2c + 8i + 1 (codes i + 4): shifted
        # right by 4i, its two 16-bit halves start with the row pair one A-fragment register holds
        rows = []
        for block in range(k // 32):
            for c in range(4):
                rows += [32 * block + 2 * c + 8 * i for i in range(4)] + [32 * block + 2 * c + 8 * i + 1 for i in range(4)]
        assert sorted(rows) == list(range(k))
    assert torch.equal(unpacked, codes.T[perm][rows].to(unpacked.dtype))


def test_fragment_order_only_where_it_applies():
    """4-bit layers whose compute rows come in whole blocks of 32 are stored in fragment order; other widths and
    a K of 80 (a partial block) keep the plain order (the kernel tests cover both orders at K = 160 and 80)."""
    for bits, k, expected in ((4, 160, True), (4, 80, False), (8, 160, False), (2, 160, False)):
        *_, t, _ = random_gptq_layer(16, k, bits, -1, False, True, "gptq_v2", seed=bits)
        weight = repack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, "gptq_v2")
        assert weight.fragment_order == expected, (bits, k)


def test_backend_matmul_single_row_3d_input():
    """TritonBackend.matmul on x [1, 1, K] takes the GEMV path and keeps the leading dims."""
    n, k, bits = 64, 128, 4
    codes, scales, zeros, g_idx, t, bias = random_gptq_layer(n, k, bits, 32, True, True, "gptq", seed=11)
    backend = TritonBackend(tune=False)
    layer = backend.prepare(GptqLinearTensors(t["qweight"].to(DEVICE), t["qzeros"].to(DEVICE), t["scales"].to(DEVICE),
                                              t["g_idx"].to(DEVICE), bias.to(DEVICE), bits, 32, "gptq"))
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(12)).bfloat16().to(DEVICE)
    assert backend.plan_for(x.reshape(1, k), layer).kind == "gemv"
    y = backend.matmul(x, layer)
    assert y.shape == (1, 1, n) and y.dtype == torch.bfloat16
    assert relative_error(y.reshape(1, n), reference(x.reshape(1, k), codes, scales, zeros, g_idx, bias)) < 1e-2
