"""The Triton EXL2 kernels (fused matmul per bit width, dequantize) against the torch reference, in float64 for
the matmul and bit for bit for the dequantized weight: every EXL2 width, several widths in one layer, odd output
widths, M = 1, 3, 17; on CPU through the Triton interpreter."""


import pytest
import torch
from kernel_env import DEVICE


from qtool.formats.exl2 import exl2_tensors_from_weight
from qtool.kernels.exl2_dequant_ref import dequantize_exl2
from qtool.kernels.exl2_triton import exl2_dequantize, exl2_linear_triton, exl2_matmul, prepare_exl2

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
pytestmark = pytest.mark.usefixtures("kernels_can_run")


@pytest.fixture(scope="module")
def layer(make_random_exl2_weight):
    """layer(layout, out_features, seed, bias=False) -> (Exl2Weight, its checkpoint tensors on DEVICE, bias or None),
    the bias drawn from the weight's generator after it."""

    def build(layout, out_features, seed, bias=False):
        gen = torch.Generator().manual_seed(seed)
        w = make_random_exl2_weight(layout, out_features, gen)
        tensors = {k: v.to(DEVICE) for k, v in exl2_tensors_from_weight(w).items()}
        b = (torch.randn(out_features, generator=gen) * 0.1).half().to(DEVICE) if bias else None
        return w, tensors, b

    return build


def prepared(tensors, out_features, bias=None):
    return prepare_exl2(tensors["q_weight"], tensors["q_invperm"], tensors["q_scale"], tensors["q_scale_max"], tensors["q_groups"], out_features, bias)


LAYOUTS = {
    "every width": [(8, 32), (6, 32), (5, 32), (4, 32), (3, 32), (2, 32)],
    "4-bit two groups": [(4, 64), (4, 32)],
    "3/2 with a 2-bit run of two groups": [(3, 32), (2, 32), (2, 32)],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dequantize_is_bit_exact(name, dtype, layer):
    w, tensors, _ = layer(LAYOUTS[name], 45, seed=len(name))
    got = exl2_dequantize(prepared(tensors, 45), dtype)
    expected = dequantize_exl2(tensors["q_weight"], tensors["q_invperm"], tensors["q_scale"], tensors["q_scale_max"], tensors["q_groups"], 45, dtype)
    assert got.dtype == dtype and torch.equal(got.T, expected)
    assert torch.equal(got.T.cpu(), w.dequantize(torch.float32).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("name", ["every width", "3/2 with a 2-bit run of two groups"])
def test_fused_matmul_matches_reference(name, m, dtype, layer):
    w, tensors, bias = layer(LAYOUTS[name], 77, seed=m, bias=m == 3)
    x = torch.randn(m, w.in_features, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    got = exl2_matmul(x, prepared(tensors, 77, bias))
    weight = w.dequantize(torch.float32).to(dtype).double().to(DEVICE)  # the weight rounded as the kernel rounds it
    expected = x.double() @ weight.T + (bias.to(dtype).double() if bias is not None else 0)
    assert got.dtype == dtype and got.shape == (m, 77)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_large_m_path_and_batch_shape(layer):
    w, tensors, bias = layer(LAYOUTS["4-bit two groups"], 40, seed=5, bias=True)
    layout = prepared(tensors, 40, bias)
    x = torch.randn(2, 70, w.in_features, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)  # M = 140
    got = exl2_linear_triton(x, layout)
    expected = x.double() @ w.dequantize(torch.float32).half().double().to(DEVICE).T + bias.double()
    assert got.shape == (2, 70, 40)
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))


def test_exl2_linear_triton_backend_matches_torch_backend(layer):
    from qtool.kernels.exl2_linear import Exl2Linear

    w, _, bias = layer(LAYOUTS["every width"], 45, seed=8, bias=True)
    module = Exl2Linear.from_weight(w, bias).to(DEVICE)
    x = torch.randn(3, w.in_features, generator=torch.Generator().manual_seed(8)).half().to(DEVICE)
    module.set_backend("torch")
    reference = module(x)
    module.set_backend("triton")
    assert module.route(x).name == "triton"
    got = module(x)
    torch.testing.assert_close(got.double(), reference.double(), rtol=2e-3, atol=2e-3 * float(reference.abs().max()))
    # reloading the buffers rebuilds the compute layout
    module.q_scale.copy_(torch.zeros_like(module.q_scale))  # every level 1
    assert not torch.allclose(module(x).double(), got.double())
