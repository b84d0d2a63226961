"""A GPTQ linear on the dequant backend plus a low-rank term as one autograd function: y and the gradients of x, A
and B against float64 (W from independently packed random codes), bias and leading dimensions; where the function
does not apply (another backend, mixed dtypes, autocast) the helper says so with None. On CPU through the Triton
interpreter."""


import pytest
import torch
from gptq_reference import random_gptq_codes, reference_weight, relative_error
from kernel_env import DEVICE


from qtool.kernels.dequant_backend import GptqDequantBackend
from qtool.kernels.low_rank_autograd import dequant_linear_plus_low_rank
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.registry import BackendRegistry
from qtool.kernels.torch_backends import GptqTorchBackend

TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
pytestmark = pytest.mark.usefixtures("kernels_can_run")


def module_on(backend, n=96, k=160, bits=4, group_size=32, act_order=True, seed=0):
    layer = random_gptq_codes(n, k, bits, group_size, act_order, True, "gptq", seed)
    module = QuantLinear(k, n, bits, group_size, bias=True)
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        getattr(module, name).copy_(getattr(layer, name))
    registry = BackendRegistry(factories={"dequant": GptqDequantBackend, "torch": GptqTorchBackend},
                               auto_order={"cpu": ("torch",), "cuda": ("torch",)})
    module = module.to(DEVICE)
    module.set_backend(backend, registry)
    return module, reference_weight(layer.codes, layer.scales, layer.zeros, layer.g_idx), layer.bias.double()


@pytest.mark.parametrize("dtype,rank,m", [(torch.bfloat16, 8, 37), (torch.float32, 3, 5)])
def test_output_and_gradients_equal_float64(dtype, rank, m):
    module, weight, bias = module_on("dequant", seed=rank)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, 160, generator=gen)
    a = torch.randn(rank, 160, generator=gen) * 0.1
    b = torch.randn(96, rank, generator=gen) * 0.1
    dy = torch.randn(2, m, 96, generator=gen)
    scaling = 1.75
    leaves = [t.to(dtype).to(DEVICE).requires_grad_() for t in (x, a, b)]
    y = dequant_linear_plus_low_rank(module, *leaves, scaling)
    assert "DequantLowRankFunction" in type(y.grad_fn).__name__ and y.dtype == dtype and y.shape == (2, m, 96)
    y.backward(dy.to(dtype).to(DEVICE))
    # the same in float64, by autograd, from the rounded inputs
    x64, a64, b64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
    y64 = x64 @ weight.T + bias + scaling * (x64 @ a64.T) @ b64.T
    y64.backward(dy.to(dtype).double())
    assert relative_error(y.detach(), y64.detach()) < TOLERANCE[dtype]
    for got, expected in zip(leaves, (x64, a64, b64)):
        assert got.grad.dtype == dtype
        assert relative_error(got.grad, expected.grad) < TOLERANCE[dtype]
    assert all(buffer.grad is None for buffer in module.buffers())


def test_frozen_input_gets_no_gradient_and_adapters_still_do():
    module, weight, bias = module_on("dequant", seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 160, generator=gen).to(DEVICE)
    a = (torch.randn(4, 160, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    b = (torch.randn(96, 4, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    dequant_linear_plus_low_rank(module, x, a, b, 2.0).sum().backward()
    expected_b = 2.0 * torch.ones(96, 1, dtype=torch.float64) @ (x.double().cpu() @ a.double().detach().cpu().T).sum(0, keepdim=True)
    assert relative_error(b.grad, expected_b) < 1e-5 and a.grad is not None and x.grad is None


def test_declines_where_it_does_not_apply():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 160, generator=gen).to(DEVICE)
    a = torch.randn(2, 160, generator=gen).to(DEVICE)
    b = torch.randn(96, 2, generator=gen).to(DEVICE)
    on_torch, _, _ = module_on("torch", seed=5)
    assert dequant_linear_plus_low_rank(on_torch, x, a, b, 1.0) is None  # another backend
    on_dequant, _, _ = module_on("dequant", seed=5)
    assert dequant_linear_plus_low_rank(on_dequant, x.double(), a.double(), b.double(), 1.0) is None  # no kernel dtype
    assert dequant_linear_plus_low_rank(on_dequant, x.bfloat16(), a, b, 1.0) is None  # mixed dtypes
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):  # float32 x under bfloat16 autocast
        assert dequant_linear_plus_low_rank(on_dequant, x, a, b, 1.0) is None


def test_under_autocast_in_x_dtype_float32_adapters_get_float32_gradients():
    """What a trainer with bfloat16 autocast and float32 adapters runs: a and b cast to x's dtype on the way in."""
    module, weight, bias = module_on("dequant", seed=6)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(11, 160, generator=gen).bfloat16().to(DEVICE)
    a = (torch.randn(4, 160, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    b = (torch.randn(96, 4, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    dy = torch.randn(11, 96, generator=gen).bfloat16()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y = dequant_linear_plus_low_rank(module, x, a.to(x.dtype), b.to(x.dtype), 0.5)
    assert y is not None and "DequantLowRankFunction" in type(y.grad_fn).__name__
    y.backward(dy.to(DEVICE))
    a64, b64 = [t.detach().bfloat16().double().cpu().requires_grad_() for t in (a, b)]
    y64 = x.double().cpu() @ weight.T + bias + 0.5 * (x.double().cpu() @ a64.T) @ b64.T
    y64.backward(dy.double())
    assert a.grad.dtype == b.grad.dtype == torch.float32
    assert relative_error(a.grad, a64.grad) < TOLERANCE[torch.bfloat16]
    assert relative_error(b.grad, b64.grad) < TOLERANCE[torch.bfloat16]
