"""The Triton GEMM (tl.dot, both weight-tile modes and unpack schemes, split-K), the dequantize kernel and the
backend's dispatch by M, against y = x @ W^T + b in float64 from random codes packed here independently."""


import pytest
import torch
from gptq_reference import random_gptq_codes, reference, reference_weight, relative_error
from kernel_env import DEVICE


from qtool.kernels.gptq_gemm_triton import (
    MODE_DEQUANT,
    MODE_MAGIC,
    UNPACK_RESHAPE,
    GemmConfig,
    gemm_config_valid,
    gptq_dequantize,
    gptq_gemm,
    triton_interpreted,
)
from qtool.kernels.gptq_gemm_left_triton import (
    LEFT_DENORMAL,
    LEFT_DEQUANT,
    LEFT_PACKED,
    LEFT_PAIRS,
    LeftGemmConfig,
    gptq_gemm_left,
    left_config_valid,
    left_workspace,
    x_in_bounds,
)
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.repack import repack_gptq
from qtool.kernels.triton_backend import (
    KernelTuner,
    Plan,
    TritonBackend,
    candidate_plans,
    m_bucket,
    tune_key,
    weight_copies,
)

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
pytestmark = pytest.mark.usefixtures("kernels_can_run")


def random_gptq_layer(n, k, bits, group_size, act_order, asym, checkpoint_format, seed):
    """(codes [N,K], scales [G,N] f16, zeros [G,N], g_idx [K], GptqLinearTensors on DEVICE)."""
    layer = random_gptq_codes(n, k, bits, group_size, act_order, asym, checkpoint_format, seed)
    tensors = GptqLinearTensors(
        layer.qweight.to(DEVICE), layer.qzeros.to(DEVICE), layer.scales.to(DEVICE), layer.g_idx.to(DEVICE),
        layer.bias.to(DEVICE), bits, group_size, checkpoint_format,
    )
    return layer.codes, layer.scales, layer.zeros, layer.g_idx, tensors


def repacked(t: GptqLinearTensors, fragment_order: bool = True):
    return repack_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.checkpoint_format, t.bias, fragment_order)


# (bits, group_size, act_order, asym, format, dtype, M, config)
CASES = [
    (2, 64, True, True, "gptq", torch.float16, 3, GemmConfig(16, 32, 32, split_k=2, unpack=UNPACK_RESHAPE)),
    (2, -1, False, False, "gptq_v2", torch.bfloat16, 17, GemmConfig(16, 32, 64, split_k=1, mode=MODE_DEQUANT)),
    (3, 64, True, True, "gptq_v2", torch.bfloat16, 17, GemmConfig(32, 32, 32, split_k=3)),
    (3, 32, False, True, "gptq", torch.float16, 64, GemmConfig(32, 32, 32, split_k=1, mode=MODE_DEQUANT)),
    (4, 64, True, True, "gptq", torch.bfloat16, 3, GemmConfig(16, 32, 64, split_k=2, unpack=UNPACK_RESHAPE)),
    (4, 64, False, False, "gptq", torch.float16, 64, GemmConfig(32, 32, 32, split_k=1, unpack=UNPACK_RESHAPE, mode=MODE_DEQUANT)),
    (4, -1, False, True, "gptq_v2", torch.bfloat16, 64, GemmConfig(64, 32, 32, split_k=1)),
    (4, 32, True, True, "gptq_v2", torch.float16, 17, GemmConfig(16, 32, 32, split_k=5)),
    (8, 64, True, True, "gptq_v2", torch.float16, 17, GemmConfig(16, 32, 32, split_k=2, unpack=UNPACK_RESHAPE)),
    (8, -1, False, False, "gptq", torch.bfloat16, 3, GemmConfig(16, 32, 32, split_k=2, mode=MODE_DEQUANT)),
    (8, 32, False, True, "gptq", torch.bfloat16, 64, GemmConfig(32, 32, 32, split_k=1, mode=MODE_DEQUANT, unpack=UNPACK_RESHAPE)),
]


def check_kernel_against_float64(kernel, config_valid, n, k, bits, group_size, act_order, asym, fmt, dtype, m, config,
                                 seed, fragment_order=True):
    """Run kernel(x, weight, config, out, workspace, counters) on a random layer: every output written, within
    tolerance of the float64 reference, split-K workspace left clean."""
    codes, scales, zeros, g_idx, t = random_gptq_layer(n, k, bits, group_size, act_order, asym, fmt, seed)
    weight = repacked(t, fragment_order)
    assert weight.fragment_order == (fragment_order and bits == 4 and weight.k_rows % 32 == 0)
    assert config_valid(weight, config, dtype)
    workspace = torch.zeros(m * n, device=DEVICE)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    kernel(x, weight, config, out, workspace, counters)
    assert torch.isfinite(out).all(), "an output element was not written"
    assert relative_error(out, reference(x, codes, scales, zeros, g_idx, t.bias)) < TOLERANCE[dtype]
    assert not workspace.any() and not counters.any(), "split-K left the workspace dirty"


# the 4-bit cases run in fragment order (K = 160 is whole blocks of 32) and again in plain order
@pytest.mark.parametrize("bits,group_size,act_order,asym,fmt,dtype,m,config,fragment_order",
                         [c + (True,) for c in CASES] + [c + (False,) for c in CASES if c[0] == 4])
def test_gemm_matches_float64_reference(bits, group_size, act_order, asym, fmt, dtype, m, config, fragment_order):
    check_kernel_against_float64(gptq_gemm, gemm_config_valid, 96, 160, bits, group_size, act_order, asym, fmt, dtype,
                                 m, config, seed=bits * 1000 + group_size * 10 + m, fragment_order=fragment_order)


# the weight-left kernel: (bits, group_size, act_order, asym, format, dtype, M, config)
LEFT_CASES = [
    (2, 64, True, True, "gptq", torch.float16, 3, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_PAIRS)),
    (2, 96, False, True, "gptq_v2", torch.bfloat16, 64, LeftGemmConfig(32, 32, 32, mode=LEFT_DEQUANT)),
    (2, -1, False, False, "gptq_v2", torch.bfloat16, 17, LeftGemmConfig(16, 16, 64, split_k=3, mode=LEFT_PAIRS)),
    (4, 64, True, True, "gptq", torch.bfloat16, 1, LeftGemmConfig(16, 32, 64, split_k=2, mode=LEFT_PAIRS)),
    (4, 64, False, True, "gptq_v2", torch.bfloat16, 17, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_DEQUANT)),
    (4, 32, True, False, "gptq", torch.float16, 64, LeftGemmConfig(64, 32, 32, mode=LEFT_PAIRS)),
    (4, -1, False, True, "gptq_v2", torch.float16, 3, LeftGemmConfig(16, 16, 32, split_k=5, mode=LEFT_DEQUANT)),
    (8, 64, True, True, "gptq_v2", torch.float16, 17, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_PAIRS)),
    (8, 32, False, True, "gptq", torch.bfloat16, 3, LeftGemmConfig(16, 32, 32, mode=LEFT_DEQUANT)),
    (8, -1, True, False, "gptq", torch.bfloat16, 64, LeftGemmConfig(32, 16, 64, split_k=2, mode=LEFT_DEQUANT)),
    (2, 64, True, True, "gptq_v2", torch.bfloat16, 17, LeftGemmConfig(16, 32, 64, split_k=2, mode=LEFT_DENORMAL)),
    (2, -1, False, False, "gptq", torch.bfloat16, 3, LeftGemmConfig(16, 16, 32, split_k=3, mode=LEFT_DENORMAL)),
    (4, 96, False, True, "gptq", torch.bfloat16, 64, LeftGemmConfig(32, 32, 32, mode=LEFT_DENORMAL)),
    (4, 32, True, False, "gptq_v2", torch.bfloat16, 1, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_DENORMAL)),
    (8, 64, True, True, "gptq", torch.bfloat16, 17, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_DENORMAL)),
    (8, -1, False, True, "gptq_v2", torch.bfloat16, 64, LeftGemmConfig(32, 16, 64, mode=LEFT_DENORMAL)),
    # K = 160 in tiles of 64 and 128: a last K tile with one block of 32 rows, in fragment and plain order
    (4, -1, False, True, "gptq_v2", torch.bfloat16, 5, LeftGemmConfig(16, 32, 64, split_k=2, mode=LEFT_DENORMAL)),
    (4, -1, False, False, "gptq", torch.float16, 3, LeftGemmConfig(16, 32, 128, mode=LEFT_DEQUANT)),
    # M and K multiples of the tile, no act order: x is read without masks (x_in_bounds)
    (4, -1, False, True, "gptq_v2", torch.bfloat16, 32, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_DENORMAL)),
    (8, 32, False, False, "gptq", torch.float16, 48, LeftGemmConfig(16, 16, 32, mode=LEFT_DEQUANT)),
]


# PACKED (4-bit in fragment order only): both 16-bit types, act order, sym and asym, per-channel, partial tiles
# (scale_ahead: the scales one tile ahead across group boundaries and split-K ranges; staged_words changes only
# the GPU's copy layout, here it checks the identity it is built from)
PACKED_CASES = [
    (4, 64, True, True, "gptq", torch.bfloat16, 1, LeftGemmConfig(16, 32, 64, split_k=2, mode=LEFT_PACKED)),
    (4, 32, False, True, "gptq_v2", torch.float16, 17,
     LeftGemmConfig(16, 32, 32, split_k=3, mode=LEFT_PACKED, scale_ahead=True)),
    (4, 96, True, False, "gptq", torch.float16, 64,
     LeftGemmConfig(32, 32, 32, mode=LEFT_PACKED, staged_words=True, scale_ahead=True)),
    (4, -1, False, True, "gptq_v2", torch.bfloat16, 3,
     LeftGemmConfig(16, 16, 128, split_k=2, mode=LEFT_PACKED, scale_ahead=True)),
    (4, -1, False, False, "gptq", torch.bfloat16, 32,
     LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_PACKED, staged_words=True)),
]


# stream-K on N = 80, K = 160: with 16x32 tiles and 32-row K tiles, M = 17 has 6 tiles x 5 K tiles = 30 units and
# M = 3 has 15. 4 programs (8 units each) share tiles two ways; 7 requested give 5 programs of 3 units, so a tile is
# summed by up to 3 programs and a program sums pieces of 2 tiles; 3 programs take 2 whole tiles each (no
# workspace); 40 requested give 30 programs of one unit (tiles summed by 5). 32-row M tiles with 64-row K tiles:
# 6 tiles x 3 units over 4 programs of 5 units.
STREAM_CASES = [
    (4, 32, True, True, "gptq", torch.bfloat16, 17, LeftGemmConfig(16, 32, 32, mode=LEFT_DENORMAL, stream_programs=4)),
    (4, -1, False, False, "gptq_v2", torch.float16, 3,
     LeftGemmConfig(16, 32, 32, mode=LEFT_PACKED, scale_ahead=True, stream_programs=7)),
    (4, 64, False, True, "gptq_v2", torch.bfloat16, 64, LeftGemmConfig(32, 32, 64, mode=LEFT_PACKED, stream_programs=4)),
    (8, 32, True, True, "gptq_v2", torch.float16, 17, LeftGemmConfig(16, 32, 32, mode=LEFT_DEQUANT, stream_programs=3)),
    (2, -1, False, True, "gptq", torch.bfloat16, 32, LeftGemmConfig(16, 32, 32, mode=LEFT_PAIRS, stream_programs=40)),
]


@pytest.mark.parametrize("bits,group_size,act_order,asym,fmt,dtype,m,config,fragment_order",
                         [c + (True,) for c in LEFT_CASES + PACKED_CASES + STREAM_CASES]
                         + [c + (False,) for c in LEFT_CASES if c[0] == 4])
def test_weight_left_gemm_matches_float64_reference(bits, group_size, act_order, asym, fmt, dtype, m, config,
                                                    fragment_order):
    """N = 80 leaves a partial weight tile (block_n 32), K = 160 a partial last group for group sizes 64 and 96;
    4-bit layers run in fragment order (the tile permuted into the wgmma fragment layout) and in plain order."""
    check_kernel_against_float64(gptq_gemm_left, left_config_valid, 80, 160, bits, group_size, act_order, asym, fmt,
                                 dtype, m, config, seed=bits * 1000 + group_size * 10 + m + 7, fragment_order=fragment_order)


def test_x_is_read_unmasked_only_when_every_tile_is_inside_it():
    """The two in-bounds LEFT_CASES above take the unmasked path; a partial M tile, a partial last K tile or an
    act-order permutation does not."""
    def layer(group_size, act_order):
        return repacked(random_gptq_layer(80, 160, 4, group_size, act_order, True, "gptq_v2", 3)[-1], True)

    for bits, group_size, act_order, asym, fmt, _, m, config in LEFT_CASES[-2:]:
        t = random_gptq_layer(80, 160, bits, group_size, act_order, asym, fmt, 3)[-1]
        assert x_in_bounds(torch.zeros(m, 160), repacked(t), config.block_m, config.block_k)
    plain, grouped, permuted = layer(-1, False), layer(32, False), layer(32, True)
    x = torch.zeros(32, 160)
    assert x_in_bounds(x, plain, 16, 32) and x_in_bounds(x, grouped, 32, 32)
    assert not x_in_bounds(x[:31], plain, 16, 32)  # a partial M tile
    assert not x_in_bounds(x, plain, 16, 64)  # K = 160: a partial last K tile
    assert not x_in_bounds(x, permuted, 16, 32)


def test_weight_left_refuses_what_it_cannot_compute_exactly():
    """3-bit units span words; BASE + q with 8-bit q is not exact in bfloat16; K tiles must stay in a group."""
    *_, t8 = random_gptq_layer(32, 64, 8, 32, False, True, "gptq_v2", seed=1)
    *_, t3 = random_gptq_layer(32, 64, 3, 32, False, True, "gptq_v2", seed=1)
    w8, w3 = repacked(t8), repacked(t3)
    pairs, dequant = LeftGemmConfig(16, 32, 32, mode=LEFT_PAIRS), LeftGemmConfig(16, 32, 32, mode=LEFT_DEQUANT)
    assert not left_config_valid(w8, pairs, torch.bfloat16) and left_config_valid(w8, pairs, torch.float16)
    assert left_config_valid(w8, dequant, torch.bfloat16)
    assert not left_config_valid(w3, dequant, torch.float16)
    assert not left_config_valid(w8, LeftGemmConfig(16, 32, 64, mode=LEFT_DEQUANT), torch.float16)
    denormal = LeftGemmConfig(16, 32, 32, mode=LEFT_DENORMAL)  # float16 has no room for the 2^-40 tile values
    assert left_config_valid(w8, denormal, torch.bfloat16) and not left_config_valid(w8, denormal, torch.float16)
    # a fragment-order tile is built from whole blocks of 32 rows; PAIRS gathers x instead and takes any K tile
    *_, t4 = random_gptq_layer(32, 64, 4, 32, False, True, "gptq_v2", seed=1)
    w4, w4_plain = repacked(t4), repacked(t4, fragment_order=False)
    assert w4.fragment_order and not w4_plain.fragment_order
    for mode in (LEFT_DEQUANT, LEFT_DENORMAL):
        assert not left_config_valid(w4, LeftGemmConfig(16, 32, 16, mode=mode), torch.bfloat16)
        assert left_config_valid(w4_plain, LeftGemmConfig(16, 32, 16, mode=mode), torch.bfloat16)
    assert left_config_valid(w4, LeftGemmConfig(16, 32, 16, mode=LEFT_PAIRS), torch.float16)
    # PACKED's code pairs are the fragment's row pairs only in fragment order, which only 4-bit layers have
    packed = LeftGemmConfig(16, 32, 32, mode=LEFT_PACKED)
    assert left_config_valid(w4, packed, torch.bfloat16) and left_config_valid(w4, packed, torch.float16)
    assert not left_config_valid(w4_plain, packed, torch.bfloat16) and not left_config_valid(w8, packed, torch.float16)
    assert not left_config_valid(w4, LeftGemmConfig(16, 32, 16, mode=LEFT_PACKED), torch.bfloat16)
    # staged words and scales ahead: PACKED only
    for staged, ahead in ((True, False), (False, True), (True, True)):
        assert left_config_valid(w4, LeftGemmConfig(16, 32, 32, mode=LEFT_PACKED, staged_words=staged,
                                                    scale_ahead=ahead), torch.float16)
        for mode in (LEFT_PAIRS, LEFT_DEQUANT, LEFT_DENORMAL):
            assert not left_config_valid(w4, LeftGemmConfig(16, 32, 32, mode=mode, staged_words=staged,
                                                            scale_ahead=ahead), torch.bfloat16)
    with pytest.raises(ValueError, match="cannot run"):
        gptq_gemm_left(torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE), w8, pairs,
                       torch.empty(2, 32, dtype=torch.bfloat16, device=DEVICE), torch.zeros(64, device=DEVICE),
                       torch.zeros(8, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_left_denormal_tiles_equal_dequantized_tiles(bits):
    """LEFT_DENORMAL builds s*(q - z) * 2^-40 from subnormal codes; with one rounding like LEFT_DEQUANT's it must give
    bit-identical outputs, also for float16 scales from 2^-24 (subnormal) to 65504, where a wrong exponent split
    would overflow or flush."""
    codes, scales, zeros, g_idx, t = random_gptq_layer(64, 128, bits, 32, True, True, "gptq", seed=bits)
    extremes = torch.tensor([2.0 ** -24, 2.0 ** -14, 2.0 ** -3, 1.0, 2.0 ** 8, 65504.0], dtype=torch.float16)
    t.scales = extremes[torch.arange(t.scales.numel()) % extremes.numel()].reshape(t.scales.shape).to(DEVICE)
    weight = repacked(t)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(bits + 1)).to(torch.bfloat16).to(DEVICE)
    x[:, ::3] *= 1e-4  # small activations against huge scales: sums with a wide dynamic range
    outs = []
    for mode in (LEFT_DEQUANT, LEFT_DENORMAL):
        out = torch.empty(5, 64, dtype=torch.bfloat16, device=DEVICE)
        gptq_gemm_left(x, weight, LeftGemmConfig(16, 32, 32, mode=mode), out, torch.zeros(1, device=DEVICE),
                       torch.zeros(1, dtype=torch.int32, device=DEVICE))
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_backend_serves_a_weight_left_plan():
    """run_plan dispatches kind "left" (with split-K through the backend's shared workspace)."""
    codes, scales, zeros, g_idx, t = random_gptq_layer(64, 128, 4, 32, True, True, "gptq", seed=11)
    backend = TritonBackend(tune=False)
    layer = backend.prepare(t)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(12)).to(torch.float16).to(DEVICE)
    plan = Plan("left", LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_PAIRS))
    for _ in range(2):  # the second call reuses the workspace the first must have left clean
        y = backend.run_plan(plan, x, layer)
        assert relative_error(y, reference(x, codes, scales, zeros, g_idx, t.bias)) < TOLERANCE[torch.float16]


def test_stream_k_is_tried_where_whole_tiles_leave_sms_idle():
    """From M = 65, the one-program-per-SM tile shapes whose grid of whole tiles ends in a partial wave (under four
    waves) are also tried as stream-K with one program per SM; a grid of whole waves, or skinny M, is not."""
    *_, t = random_gptq_layer(12288, 128, 4, 128, False, True, "gptq_v2", seed=5)  # 7B qkv's N
    layer = repacked(t)
    stream = [p.config for p in candidate_plans(layer, 256, torch.bfloat16, 132)
              if p.kind == "left" and p.config.stream_programs]
    # 96 tiles of 256x128 and 192 of 128x128, for 132 SMs holding one 8-warp program each
    assert {(c.block_m, c.block_n) for c in stream} == {(256, 128), (128, 128)}
    assert all(c.stream_programs == 132 and c.split_k == 1 for c in stream)
    assert not any(p.kind == "left" and p.config.stream_programs
                   for m in (16, 64) for p in candidate_plans(layer, m, torch.bfloat16, 132))
    # M = 128: the large tiles only (one program per SM), not the 64-token ones
    stream = [p.config for p in candidate_plans(layer, 128, torch.bfloat16, 132)
              if p.kind == "left" and p.config.stream_programs]
    assert stream and all(c.block_m == 128 and c.num_warps == 8 for c in stream)
    # 96 SMs: 96 tiles of 256x128 and 192 of 128x128 are whole waves
    assert not any(p.kind == "left" and p.config.stream_programs
                   for p in candidate_plans(layer, 256, torch.bfloat16, 96))


def test_stream_k_needs_no_split():
    w4 = repacked(random_gptq_layer(64, 128, 4, 32, False, True, "gptq_v2", seed=5)[-1])
    assert left_config_valid(w4, LeftGemmConfig(16, 32, 32, mode=LEFT_DENORMAL, stream_programs=8), torch.bfloat16)
    assert not left_config_valid(w4, LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_DENORMAL, stream_programs=8),
                                 torch.bfloat16)


def test_backend_serves_a_stream_k_plan_with_its_workspace():
    """run_plan gives a stream-K plan the shared workspace (3 programs over 2 x 2 tiles of 4 K tiles, 6 units each:
    the second tile is summed by two programs) and it is left clean for the next call and for a split-K plan."""
    codes, scales, zeros, g_idx, t = random_gptq_layer(64, 128, 4, 32, False, True, "gptq_v2", seed=13)
    backend = TritonBackend(tune=False)
    layer = backend.prepare(t)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16).to(DEVICE)
    plan = Plan("left", LeftGemmConfig(16, 32, 32, mode=LEFT_DENORMAL, stream_programs=3))
    assert left_workspace(20, layer, plan.config) == (20 * 64, 4)
    split = Plan("left", LeftGemmConfig(16, 32, 32, split_k=2, mode=LEFT_DENORMAL))
    for run in (plan, plan, split):
        y = backend.run_plan(run, x, layer)
        assert relative_error(y, reference(x, codes, scales, zeros, g_idx, t.bias)) < TOLERANCE[torch.bfloat16]
    # whole tiles per program (4 programs of 4 units) need no workspace; split-K needs [M, N] and a counter per tile
    assert left_workspace(20, layer, LeftGemmConfig(16, 32, 32, mode=LEFT_DENORMAL, stream_programs=4)) == (0, 0)
    assert left_workspace(20, layer, split.config) == (20 * 64, 4)


def test_fragment_order_layers_are_not_tuned_over_the_gathering_plans():
    """A 4-bit layer in fragment order is tuned over the GEMV, the weight-left kernel with its tile in row order
    and dequantize + matmul; the plans that would gather x (PAIRS, the x-left tl.dot kernel) stay for other layers."""
    *_, t4 = random_gptq_layer(64, 256, 4, 128, False, True, "gptq_v2", seed=5)
    *_, t8 = random_gptq_layer(64, 256, 8, 128, False, True, "gptq_v2", seed=5)
    fragment, plain, wide = repacked(t4), repacked(t4, fragment_order=False), repacked(t8)
    for m in (1, 4, 64, 512):
        for dtype in (torch.float16, torch.bfloat16):
            plans = candidate_plans(fragment, m, dtype, 132)
            assert plans and all(p.kind in ("gemv", "left", "dequant") for p in plans)
            assert not any(p.kind == "left" and p.config.mode == LEFT_PAIRS for p in plans)
            # PACKED (fragment order only) on token tiles of up to 64
            packed = [p.config for p in plans if p.kind == "left" and p.config.mode == LEFT_PACKED]
            assert (len(packed) > 0) == (m <= 128) and all(c.block_m <= 64 for c in packed)
            assert not any(p.kind == "left" and p.config.mode == LEFT_PACKED
                           for p in candidate_plans(plain, m, dtype, 132) + candidate_plans(wide, m, dtype, 132))
            assert (Plan("dequant") in plans) == (m >= 32)
            assert any(p.kind == "gemm" for p in candidate_plans(plain, m, dtype, 132))
            assert any(p.kind == "gemm" for p in candidate_plans(wide, m, dtype, 132))


def test_magic_mode_refuses_8bit_bfloat16():
    """1 + q/256 is not exact in bfloat16, so that combination must go through MODE_DEQUANT."""
    *_, t = random_gptq_layer(32, 64, 8, 32, False, True, "gptq_v2", seed=1)
    weight = repacked(t)
    assert not gemm_config_valid(weight, GemmConfig(16, 32, 32, mode=MODE_MAGIC), torch.bfloat16)
    assert gemm_config_valid(weight, GemmConfig(16, 32, 32, mode=MODE_MAGIC), torch.float16)
    assert gemm_config_valid(weight, GemmConfig(16, 32, 32, mode=MODE_DEQUANT), torch.bfloat16)
    assert not gemm_config_valid(weight, GemmConfig(16, 32, 64), torch.float16)  # K tile straddles groups of 32


@pytest.mark.parametrize("bits,act_order", [(3, True), (4, False), (8, True)])
def test_dequantize_writes_original_column_order(bits, act_order):
    codes, scales, zeros, g_idx, t = random_gptq_layer(64, 160, bits, 64, act_order, True, "gptq", seed=bits)
    w_t = gptq_dequantize(repacked(t), torch.float32)
    expected = reference_weight(codes, scales, zeros, g_idx).T
    torch.testing.assert_close(w_t.double().cpu(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_and_triton_dequantize_round_once_to_the_same_bits(dtype):
    """Float16 scales with bfloat16 weights: both the torch reference and the Triton dequantize kernel give
    s*(q - z) rounded once (no rounding of the scale first), so the torch and triton backends agree bit for bit
    on the large-M path."""
    from qtool.kernels.dequant_ref import dequantize_gptq

    codes, scales, zeros, g_idx, t = random_gptq_layer(64, 160, 4, 32, True, True, "gptq", seed=21)
    expected = reference_weight(codes, scales, zeros, g_idx).to(dtype)
    torch_weight = dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, 4, "gptq", dtype)
    triton_weight_t = gptq_dequantize(repacked(t), dtype)
    assert torch.equal(torch_weight.cpu(), expected)
    if triton_interpreted():
        # the interpreter's own float32 -> 16-bit cast is not round-to-nearest-even: allow it one unit in the
        # last place; compiled, the kernel's cast is the hardware's and the bits must agree
        _, exponent = torch.frexp(expected.float())
        ulp = torch.pow(2.0, (exponent - 1 - (7 if dtype == torch.bfloat16 else 10)).float())
        assert ((triton_weight_t.T.float().cpu() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(triton_weight_t.T.cpu(), expected)


@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (3, torch.bfloat16), (17, torch.float16), (64, torch.bfloat16), (5, torch.float32)])
def test_backend_matmul_every_m_bucket(m, dtype):
    """TritonBackend.matmul on [1, m, K] inputs: the GEMV, split-K, tiled and float32 (dequantize) paths."""
    bits, n, k = 4, 96, 160
    codes, scales, zeros, g_idx, t = random_gptq_layer(n, k, bits, 64, True, True, "gptq", seed=m)
    backend = TritonBackend(tune=False)  # on CUDA: the default plan of each bucket; every candidate is tested below
    layer = backend.prepare(t)
    x = torch.randn(1, m, k, generator=torch.Generator().manual_seed(m + 100)).to(dtype).to(DEVICE)
    y = backend.matmul(x, layer)
    assert y.shape == (1, m, n) and y.dtype == dtype
    assert relative_error(y.reshape(m, n), reference(x.reshape(m, k), codes, scales, zeros, g_idx, t.bias)) < TOLERANCE[dtype]


def test_weight_copies_for_timing_hold_the_same_weight_in_new_memory():
    """The tuner cycles copies so that each timed call streams its weight from device memory: equal values,
    separate storage for every streamed tensor, and each copy computes the same product."""
    codes, scales, zeros, g_idx, t = random_gptq_layer(48, 128, 4, 32, True, True, "gptq", seed=31)
    weight = repacked(t)
    copies = weight_copies(weight, 3)
    assert len(copies) == 3 and copies[0] is weight
    for copy in copies[1:]:
        for name in ("qweight", "scales", "zeros"):
            original, cloned = getattr(weight, name), getattr(copy, name)
            assert torch.equal(original, cloned) and cloned.data_ptr() != original.data_ptr()
    backend = TritonBackend(tune=False)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(32)).to(torch.float16).to(DEVICE)
    outputs = [backend.matmul(x, w) for w in copies]
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_tuner_picks_fastest_correct_plan_once():
    """Wrong or failing candidates are skipped, the fastest correct one is cached per key."""
    expected = torch.randn(4, 8)
    outputs = {"slow": expected.clone(), "fast-wrong": expected + 1.0, "fast": expected + 1e-4, "broken": None}
    ms_of_output = {id(outputs["slow"]): 2.0, id(outputs["fast-wrong"]): 0.1, id(outputs["fast"]): 0.5}
    calls = []

    def run(plan):
        calls.append(plan.kind)
        if outputs[plan.kind] is None:
            raise RuntimeError("does not compile")
        return outputs[plan.kind]

    tuner = KernelTuner(timer=lambda calls: ms_of_output[id(calls[0]())])
    *_, t = random_gptq_layer(32, 64, 4, 32, False, True, "gptq_v2", seed=3)
    key = tune_key(repacked(t), 3, torch.float16, torch.device("cpu"))
    plans = [Plan(name) for name in outputs]
    assert tuner.choose(key, plans, run, lambda: expected).kind == "fast"
    assert [r[0] for r in tuner.timings[key]] == list(outputs)
    calls.clear()
    assert tuner.choose(key, plans, run, lambda: expected).kind == "fast" and not calls  # cached: nothing re-run
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 1000, 10**6)] == [1, 2, 4, 16, 32, 1024, 4096]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles every tuning candidate; needs CUDA")
@pytest.mark.parametrize("bits,group_size,act_order,dtype", [
    (4, 128, False, torch.bfloat16), (4, 32, True, torch.float16), (3, 128, False, torch.bfloat16), (8, -1, False, torch.float16),
])
def test_every_tuning_candidate_on_gpu(bits, group_size, act_order, dtype):
    """Every plan the tuner may pick computes the right result (the tuner would silently drop a wrong one)."""
    n, k = 768, 1024
    codes, scales, zeros, g_idx, t = random_gptq_layer(n, k, bits, group_size, act_order, True, "gptq_v2", seed=bits)
    backend = TritonBackend(tune=False)
    layer = backend.prepare(t)
    failures = []
    for m in (1, 3, 16, 48, 128, 256):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
        ref = reference(x, codes, scales, zeros, g_idx, t.bias)
        for plan in candidate_plans(layer, m, dtype, torch.cuda.get_device_properties(0).multi_processor_count):
            for attempt in range(2):  # the second call catches a split-K workspace left dirty by the first
                try:
                    y = backend.run_plan(plan, x, layer)
                    torch.cuda.synchronize()
                except Exception as exc:  # report every failing config, not just the first
                    failures.append(f"M={m}: {plan.describe()}: {type(exc).__name__}: {str(exc)[:300]}")
                    break
                error = relative_error(y, ref)
                if not error < TOLERANCE[dtype]:
                    failures.append(f"M={m} call {attempt}: {plan.describe()}: relative error {error:.2e}")
    assert not failures, "\n".join(failures)


def test_an_outgrown_workspace_stays_alive_for_graphs_captured_over_it():
    """A CUDA graph replays into the buffers it was captured with: growing the workspace must not free the old one."""
    import gc
    import weakref

    backend = TritonBackend(tune=False)
    small = backend._workspace(torch.device("cpu"), 8, 2)
    seen = weakref.ref(small.partials)
    grown = backend._workspace(torch.device("cpu"), 800, 2)
    del small
    gc.collect()
    assert grown.partials.numel() >= 800 and seen() is not None
