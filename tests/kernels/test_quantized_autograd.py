"""QuantLinear and Exl2Linear as functions of their input: with x requiring grad the forward goes through
QuantizedLinearFunction, whose backward passes torch.autograd.gradcheck in float64 (the torch reference path) and
leaves the packed buffers without gradients; without grad (no requires_grad, no_grad, inference_mode) the forward
is the plain routed matmul, with no autograd node."""

import pytest
import torch
from gptq_reference import random_gptq_codes

from qtool.formats.exl2 import exl2_tensors_from_weight
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear


def gptq_module(n, k, bits, group_size, seed):
    layer = random_gptq_codes(n, k, bits, group_size, True, True, "gptq", seed)
    module = QuantLinear(k, n, bits, group_size, bias=True)
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        getattr(module, name).copy_(getattr(layer, name))
    return module


@pytest.fixture
def exl2_module(make_random_exl2_weight):
    def build(n, seed):
        gen = torch.Generator().manual_seed(seed)
        weight = make_random_exl2_weight([(5, 32), (3, 32), (2, 32)], n, gen)
        module = Exl2Linear(96, n, weight.group_bits, weight.group_sizes)
        for name, tensor in exl2_tensors_from_weight(weight).items():
            getattr(module, name).copy_(tensor)
        return module

    return build


@pytest.mark.parametrize("kind", ["gptq3", "gptq4", "exl2"])
def test_backward_passes_gradcheck_and_leaves_buffers_alone(kind, exl2_module):
    module = exl2_module(40, seed=2) if kind == "exl2" else gptq_module(64, 96, int(kind[-1]), 32, seed=1)
    x = torch.randn(3, module.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                    requires_grad=True)
    y = module(x)
    assert "QuantizedLinearFunction" in type(y.grad_fn).__name__
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-7, fast_mode=True)
    y.sum().backward()
    assert all(buffer.grad is None for buffer in module.buffers())
    torch.testing.assert_close(x.grad, module.dequantized_weight(torch.float64).sum(0).expand(3, -1))


def test_inference_takes_no_autograd_node():
    module = gptq_module(32, 64, 4, 32, seed=3)
    x = torch.randn(2, 64)
    assert module(x).grad_fn is None
    with torch.no_grad():
        assert module(x.requires_grad_()).grad_fn is None
    with torch.inference_mode():
        assert module(torch.randn(2, 64)).grad_fn is None
