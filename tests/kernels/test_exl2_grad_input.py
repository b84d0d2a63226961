"""The EXL2 grad-input kernel (dX = dY @ dequant(W) over the checkpoint's q_weight, one launch per run of one
width, stored to the permuted input columns) against dY @ W in float64 from the unpacked weight, and against
qtool's torch reference: every EXL2 width, mixed widths in one layer, odd output widths and M; on CPU through the
Triton interpreter."""


import pytest
import torch
from kernel_env import DEVICE


from qtool.formats.exl2 import exl2_tensors_from_weight
from qtool.kernels.exl2_grad_input_triton import exl2_grad_input
from qtool.kernels.exl2_triton import prepare_exl2
from qtool.kernels.grad_input_launch import GradInputConfig
from qtool.kernels.grad_input_ref import exl2_grad_input_ref
from qtool.kernels.linear_tensors import Exl2LinearTensors

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
SMALL = GradInputConfig(block_m=16, block_n=32, block_k=32, num_warps=2, num_stages=1)
pytestmark = pytest.mark.usefixtures("kernels_can_run")

LAYOUTS = {
    "every width": [(8, 32), (6, 32), (5, 32), (4, 32), (3, 32), (2, 32)],
    "4-bit two groups": [(4, 64), (4, 32)],
    "3/2 with a 2-bit run of two groups": [(3, 32), (2, 64), (2, 32)],
}


def relative_error(y, ref) -> float:
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype,m", [(torch.float32, 5), (torch.float16, 17), (torch.bfloat16, 3)])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("out_features", [45, 80])
def test_grad_input_matches_float64(name, dtype, m, out_features, make_random_exl2_weight):
    gen = torch.Generator().manual_seed(len(name) + m + out_features)
    weight = make_random_exl2_weight(LAYOUTS[name], out_features, gen)
    t = {key: value.to(DEVICE) for key, value in exl2_tensors_from_weight(weight).items()}
    layout = prepare_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], out_features)
    dy = torch.randn(m, out_features, generator=gen).to(dtype)
    got = exl2_grad_input(dy.to(DEVICE), layout, SMALL)
    assert got.shape == (m, weight.in_features) and got.dtype == dtype
    expected = dy.double() @ weight.dequantize(torch.float64)  # [N, K] in input-feature order
    assert relative_error(got, expected) < TOLERANCE[dtype]
    tensors = Exl2LinearTensors(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], None,
                                out_features)
    assert relative_error(exl2_grad_input_ref(dy.to(DEVICE), tensors, torch.float64), expected) < 1e-12


def test_default_launch_config(make_random_exl2_weight):
    """The tiles a GPU run uses (GradInputConfig()), with M and N not multiples of 64."""
    gen = torch.Generator().manual_seed(12)
    weight = make_random_exl2_weight(LAYOUTS["every width"], 70, gen)
    t = {key: value.to(DEVICE) for key, value in exl2_tensors_from_weight(weight).items()}
    layout = prepare_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], 70)
    dy = torch.randn(67, 70, generator=gen).to(torch.bfloat16)
    got = exl2_grad_input(dy.to(DEVICE), layout)
    assert relative_error(got, dy.double() @ weight.dequantize(torch.float64)) < TOLERANCE[torch.bfloat16]
