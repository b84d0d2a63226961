"""Exl2Linear: its buffers are the checkpoint's tensors, and its forward equals nn.functional.linear with the
weight the writer was given (float64 reference), in float32, float16 and bfloat16, with and without bias."""

import pytest
import torch

from qtool.formats.exl2 import exl2_tensors_from_weight
from qtool.kernels.exl2_linear import Exl2Linear


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_forward_matches_linear(dtype, tol, bias, m, make_random_exl2_weight):
    w = make_random_exl2_weight([(8, 32), (5, 64), (3, 64)], 45, torch.Generator().manual_seed(m))
    b = torch.randn(45).half() if bias else None
    module = Exl2Linear.from_weight(w, b)
    x = torch.randn(2, m, 160, generator=torch.Generator().manual_seed(m))
    # inputs, weight and bias rounded to dtype as the module sees them; only the accumulation differs
    xd = x.to(dtype).double()
    expected = xd @ w.dequantize(torch.float32).to(dtype).double().T + (b.to(dtype).double() if bias else 0)
    got = module(x.to(dtype))
    assert got.dtype == dtype and got.shape == (2, m, 45)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    # the weight it multiplies is the given one rounded once to dtype
    assert torch.equal(module.dequantized_weight(dtype), w.dequantize(torch.float32).to(dtype))


def test_buffers_are_the_checkpoint_tensors(make_random_exl2_weight):
    w = make_random_exl2_weight([(6, 32), (4, 64)], 40, torch.Generator().manual_seed(1))
    module = Exl2Linear.from_weight(w)
    state = module.state_dict()
    tensors = exl2_tensors_from_weight(w)
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor) and state[name].dtype == tensor.dtype, name
    back = module.exl2_weight()
    assert torch.equal(back.dequantize(), w.dequantize())
    assert "bits=6/4" in repr(module)
