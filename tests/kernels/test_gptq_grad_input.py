"""The GPTQ grad-input kernel (dX = dY @ dequant(W), a transposed dequant-GEMM) against dY @ W in float64 with W
read from random codes packed independently (gptq_reference), and against qtool's torch reference: every GPTQ
width, sym/asym, v1/v2 zeros, act order, a group size that does not divide the width, both the per-row group path
and the one-group-per-tile path, odd M and N not a multiple of the tile; on CPU through the Triton interpreter."""


import pytest
import torch
from gptq_reference import random_gptq_codes, reference_weight, relative_error
from kernel_env import DEVICE


from qtool.kernels.grad_input_launch import GradInputConfig
from qtool.kernels.grad_input_ref import gptq_grad_input_ref
from qtool.kernels.gptq_grad_input_triton import gptq_grad_input, prepare_gptq_grad
from qtool.kernels.linear_tensors import GptqLinearTensors

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
SMALL = GradInputConfig(block_m=16, block_n=32, block_k=32, num_warps=2, num_stages=1)
pytestmark = pytest.mark.usefixtures("kernels_can_run")


def layer_tensors(layer, bits, group_size, checkpoint_format):
    return GptqLinearTensors(layer.qweight.to(DEVICE), layer.qzeros.to(DEVICE), layer.scales.to(DEVICE),
                             layer.g_idx.to(DEVICE), None, bits, group_size, checkpoint_format)


# (bits, N, K, group_size, act_order, asym, checkpoint_format, dtype, M)
CASES = [
    (2, 96, 160, 64, True, True, "gptq", torch.float32, 5),
    (2, 64, 128, -1, False, False, "gptq_v2", torch.bfloat16, 19),
    (3, 96, 96, 64, True, True, "gptq_v2", torch.float32, 7),  # 96 rows: 3-bit codes straddle words
    (3, 64, 192, 32, False, True, "gptq", torch.float16, 17),
    (4, 96, 160, 64, False, True, "gptq", torch.float32, 3),  # one group per K tile; 160 = 2.5 groups
    (4, 64, 96, 32, True, False, "gptq_v2", torch.bfloat16, 33),
    (4, 160, 64, 16, False, True, "gptq_v2", torch.float16, 1),  # groups smaller than the tile: per-row groups
    (8, 96, 128, 64, True, True, "gptq_v2", torch.float32, 9),
    (8, 64, 96, 64, False, False, "gptq", torch.bfloat16, 2),
]


@pytest.mark.parametrize("bits,n,k,group_size,act_order,asym,fmt,dtype,m", CASES)
def test_grad_input_matches_float64(bits, n, k, group_size, act_order, asym, fmt, dtype, m):
    seed = bits * 1000 + n + k + m
    layer = random_gptq_codes(n, k, bits, group_size, act_order, asym, fmt, seed)
    tensors = layer_tensors(layer, bits, group_size, fmt)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = gptq_grad_input(dy.to(DEVICE), prepare_gptq_grad(tensors), SMALL)
    assert got.shape == (m, k) and got.dtype == dtype
    expected = dy.double() @ reference_weight(layer.codes, layer.scales, layer.zeros, layer.g_idx)
    assert relative_error(got, expected) < TOLERANCE[dtype]
    # the torch reference qtool falls back to reads the same tensors the same way
    assert relative_error(gptq_grad_input_ref(dy.to(DEVICE), tensors, torch.float64), expected) < 1e-12


def test_group_per_tile_only_for_plain_g_idx():
    plain = random_gptq_codes(32, 128, 4, 64, False, True, "gptq", seed=1)
    shuffled = random_gptq_codes(32, 128, 4, 64, True, True, "gptq", seed=1)
    assert prepare_gptq_grad(layer_tensors(plain, 4, 64, "gptq")).group_size == 64
    assert prepare_gptq_grad(layer_tensors(shuffled, 4, 64, "gptq")).group_size == 0


def test_leading_dimensions_and_a_strided_grad():
    layer = random_gptq_codes(64, 96, 4, 32, True, True, "gptq", seed=5)
    tensors = layer_tensors(layer, 4, 32, "gptq")
    wide = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    dy = wide[..., :64]  # rows not contiguous
    got = gptq_grad_input(dy, prepare_gptq_grad(tensors), SMALL)
    expected = dy.double().cpu() @ reference_weight(layer.codes, layer.scales, layer.zeros, layer.g_idx)
    assert got.shape == (2, 3, 96)
    assert relative_error(got, expected) < TOLERANCE[torch.float32]


def test_wrong_width_is_refused():
    layer = random_gptq_codes(32, 64, 4, 32, False, True, "gptq", seed=2)
    with pytest.raises(ValueError, match="32 outputs"):
        gptq_grad_input(torch.zeros(3, 64, device=DEVICE), prepare_gptq_grad(layer_tensors(layer, 4, 32, "gptq")))


@pytest.mark.parametrize("group_size,act_order,m", [(128, False, 70), (32, True, 70), (128, False, 1030)])
def test_default_launch_config(group_size, act_order, m):
    """The tiles a GPU run uses (default_grad_config: short and long inputs), with M, N and K none of them
    multiples of the tile."""
    layer = random_gptq_codes(96, 160, 4, group_size, act_order, True, "gptq", seed=group_size)
    dy = torch.randn(m, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    got = gptq_grad_input(dy.to(DEVICE), prepare_gptq_grad(layer_tensors(layer, 4, group_size, "gptq")))
    expected = dy.double() @ reference_weight(layer.codes, layer.scales, layer.zeros, layer.g_idx)
    assert relative_error(got, expected) < TOLERANCE[torch.bfloat16]
