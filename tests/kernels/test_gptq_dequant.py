"""The checkpoint-layout dequantize kernel (gptq_dequant_triton) bit-exact against W read from random codes packed
independently (gptq_reference) and against qtool's torch reference, every GPTQ width, act order, v1/v2 zeros,
per-channel and group sizes that do not divide the tile, K and N not multiples of the tile; and the dequant backend
built on it: forward and dX against float64, one packed copy of the weight (its form aliases the checkpoint's
qweight), one scratch shared by every layer. On CPU through the Triton interpreter."""


import pytest
import torch
from gptq_reference import random_gptq_codes, reference_weight, relative_error
from kernel_env import DEVICE


from qtool.kernels.dequant_backend import GptqDequantBackend
from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.gptq_dequant_triton import dequantize_into
from qtool.kernels.gptq_grad_input_triton import prepare_gptq_grad
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.registry import BackendRegistry
from qtool.kernels.torch_backends import GptqTorchBackend

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
pytestmark = pytest.mark.usefixtures("kernels_can_run")


def layer_tensors(layer, bits, group_size, fmt, bias=False):
    return GptqLinearTensors(layer.qweight.to(DEVICE), layer.qzeros.to(DEVICE), layer.scales.to(DEVICE),
                             layer.g_idx.to(DEVICE), layer.bias.to(DEVICE) if bias else None, bits, group_size, fmt)


# (bits, N, K, group_size, act_order, asym, checkpoint_format): N not a multiple of the 256-wide tile, K not one
# of the 64-row tile; groups of 32/96 (one group per 32-row tile), 16 (per-row groups), -1 (one group)
CASES = [
    (2, 96, 160, 64, True, True, "gptq"),
    (2, 64, 128, -1, False, False, "gptq_v2"),
    (3, 96, 96, 32, False, True, "gptq_v2"),  # 3-bit codes straddle words
    (3, 64, 192, 64, True, True, "gptq"),
    (4, 40, 160, 64, False, True, "gptq"),  # one group per tile, 160 = 2.5 groups
    (4, 264, 96, 96, False, True, "gptq_v2"),  # N past one tile; groups of 96 in 32-row tiles
    (4, 64, 96, 16, False, True, "gptq"),  # groups smaller than the tile
    (4, 96, 224, 32, True, False, "gptq_v2"),
    (8, 96, 128, 64, True, True, "gptq_v2"),
    (8, 48, 100, 128, False, True, "gptq"),  # one partial group
]


@pytest.mark.parametrize("bits,n,k,group_size,act_order,asym,fmt", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_into_is_the_reference_bit_for_bit(bits, n, k, group_size, act_order, asym, fmt, dtype):
    layer = random_gptq_codes(n, k, bits, group_size, act_order, asym, fmt, seed=bits * 1000 + n + k)
    tensors = layer_tensors(layer, bits, group_size, fmt)
    out = torch.full((k, n), float("nan"), dtype=dtype, device=DEVICE)
    got = dequantize_into(prepare_gptq_grad(tensors), out)
    assert got is out
    # one rounding of the exact float64 value, as the reference rounds it
    expected = reference_weight(layer.codes, layer.scales, layer.zeros, layer.g_idx).T.to(dtype)
    assert torch.equal(got.cpu(), expected)
    reference = dequantize_gptq(tensors.qweight, tensors.qzeros, tensors.scales, tensors.g_idx, bits, fmt, dtype)
    assert torch.equal(got, reference.T)


def test_dequantize_into_refuses_a_wrong_buffer():
    layer = random_gptq_codes(32, 64, 4, 32, False, True, "gptq", seed=2)
    form = prepare_gptq_grad(layer_tensors(layer, 4, 32, "gptq"))
    with pytest.raises(ValueError, match=r"\[64, 32\]"):
        dequantize_into(form, torch.empty(32, 64, device=DEVICE))
    with pytest.raises(ValueError, match="float64"):
        dequantize_into(form, torch.empty(64, 32, dtype=torch.float64, device=DEVICE))


def dequant_registry():
    return BackendRegistry(factories={"dequant": GptqDequantBackend, "torch": GptqTorchBackend},
                           auto_order={"cpu": ("torch",), "cuda": ("torch",)})


def quant_linear(layer, k, n, bits, group_size, fmt, registry):
    module = QuantLinear(k, n, bits, group_size, bias=True, checkpoint_format=fmt)
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        getattr(module, name).copy_(getattr(layer, name))
    module = module.to(DEVICE)
    assert module.set_backend("dequant", registry).startswith("dequant: requested")
    return module


@pytest.mark.parametrize("bits,group_size,act_order,fmt,dtype,m", [
    (4, 32, False, "gptq", torch.bfloat16, 37),
    (3, 64, True, "gptq_v2", torch.float16, 5),
    (8, 32, True, "gptq", torch.float32, 11),
])
def test_quant_linear_on_the_dequant_backend_trains_like_float64(bits, group_size, act_order, fmt, dtype, m):
    n, k = 96, 160
    layer = random_gptq_codes(n, k, bits, group_size, act_order, True, fmt, seed=bits + m)
    module = quant_linear(layer, k, n, bits, group_size, fmt, dequant_registry())
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, k, generator=gen).to(dtype)
    dy = torch.randn(2, m, n, generator=gen).to(dtype)
    x_dev = x.to(DEVICE).requires_grad_()
    y = module(x_dev)
    assert "QuantizedLinearFunction" in type(y.grad_fn).__name__ and y.dtype == dtype
    y.backward(dy.to(DEVICE))
    weight = reference_weight(layer.codes, layer.scales, layer.zeros, layer.g_idx)
    assert relative_error(y.detach(), x.double() @ weight.T + layer.bias.double()) < TOLERANCE[dtype]
    assert relative_error(x_dev.grad, dy.double() @ weight) < TOLERANCE[dtype]
    assert all(buffer.grad is None for buffer in module.buffers())
    with torch.no_grad():  # inference on this backend: the same matmul, no autograd node
        assert torch.equal(module(x.to(DEVICE)), y.detach())


def test_float64_takes_the_reference_and_passes_gradcheck():
    layer = random_gptq_codes(64, 96, 4, 32, True, True, "gptq", seed=7)
    module = quant_linear(layer, 96, 64, 4, 32, "gptq", dequant_registry())
    x = torch.randn(3, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_one_packed_copy_and_one_scratch_for_every_layer():
    registry = dequant_registry()
    shapes = [(96, 64), (64, 320), (160, 96)]  # (N, K): the largest weight is the second
    modules = []
    for i, (n, k) in enumerate(shapes):
        layer = random_gptq_codes(n, k, 4, 32, i == 1, True, "gptq", seed=i)
        modules.append(quant_linear(layer, k, n, 4, 32, "gptq", registry))
    backend = registry.get("dequant")
    device = torch.device(DEVICE)
    # prepare (set_backend) reserved the scratch for the largest layer's 16-bit weight
    assert backend.scratch.nbytes(device) == 64 * 320 * 2
    for module in modules:
        form = module.prepared_form(backend)
        # the codes are read where the checkpoint keeps them: no second packed copy of the weight
        assert form.packed.qweight.data_ptr() == module.qweight.data_ptr()
        x = torch.randn(9, module.in_features, dtype=torch.bfloat16, device=DEVICE)
        expected = x.double() @ module.dequantized_weight(torch.float64).T + module.bias.double()
        assert relative_error(module(x), expected.cpu()) < TOLERANCE[torch.bfloat16]
    assert backend.scratch.nbytes(device) == 64 * 320 * 2  # reused, not grown, by bfloat16 calls
