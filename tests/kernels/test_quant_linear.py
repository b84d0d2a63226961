"""QuantLinear and the reference dequantizer against x @ W^T computed in float64 from the unpacked
QuantizedWeight, for every bit width, group layout and checkpoint format."""

import itertools
import logging
import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.kernels.dequant_ref import contiguous_group_size, dequantize_gptq
from qtool.kernels.quant_linear import QuantLinear
from qtool.formats.quantized_weight import QuantizedWeight


def random_quantized(out_features, in_features, bits, group_size, act_order, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.05 + 1e-3).half().float()
    zeros = torch.randint(1, 1 << bits, (groups, out_features), generator=gen, dtype=torch.int32)
    g_idx = torch.zeros(in_features, dtype=torch.int32) if group_size == -1 else torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


def reference_weight(qw: QuantizedWeight) -> torch.Tensor:
    """float64 weight[o, i] = scale * (code - zero), written out here rather than taken from the library."""
    rows = qw.g_idx.long()
    return qw.scales.double()[rows].T * (qw.codes.double() - qw.zeros.double()[rows].T)


CASES = list(itertools.product((2, 3, 4, 8), (32, 64, -1), ("gptq", "gptq_v2")))


@pytest.mark.parametrize("bits,group_size,checkpoint_format", CASES)
def test_forward_float64_matches_reference(bits, group_size, checkpoint_format):
    seed = bits * 10 + group_size
    qw = random_quantized(96, 160, bits, group_size, act_order=group_size != -1, seed=seed)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(seed)).half()
    layer = QuantLinear.from_quantized(qw, bias=bias, checkpoint_format=checkpoint_format)
    x = torch.randn(3, 5, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    expected = x @ reference_weight(qw).T + bias.double()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_dequantize_gptq_matches_reference(bits):
    qw = random_quantized(64, 128, bits, 32, act_order=True, seed=bits)
    layer = QuantLinear.from_quantized(qw, checkpoint_format="gptq")
    weight = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, "gptq", torch.float64)
    assert weight.shape == (64, 128)
    assert torch.equal(weight, reference_weight(qw))
    assert dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits).dtype == torch.float16


@pytest.mark.parametrize("bits,group_size,checkpoint_format", list(itertools.product((2, 3, 4, 8), (64, 96, -1), ("gptq", "gptq_v2"))))
def test_dequantize_consecutive_groups_rounds_once_in_every_dtype(bits, group_size, checkpoint_format):
    # 224 rows: with groups of 64 or 96 the last group is short (32 rows), as GPTQ writes 576-wide layers at g128
    qw = random_quantized(96, 224, bits, group_size, act_order=False, seed=bits + group_size)
    layer = QuantLinear.from_quantized(qw, checkpoint_format=checkpoint_format)
    assert contiguous_group_size(layer.g_idx, layer.scales.shape[0]) == (224 if group_size == -1 else group_size)
    exact = reference_weight(qw)  # products of small integers and float16 scales: exact in float64
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        weight = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, checkpoint_format, dtype)
        assert weight.dtype == dtype and torch.equal(weight, exact.to(dtype))


def test_contiguous_group_size_refuses_other_layouts():
    in_order = torch.arange(224, dtype=torch.int32) // 64
    assert contiguous_group_size(in_order, 4) == 64
    assert contiguous_group_size(in_order, 5) == 0  # a group count the rows do not make
    assert contiguous_group_size(in_order[torch.randperm(224, generator=torch.Generator().manual_seed(3))], 4) == 0
    assert contiguous_group_size(torch.cat([in_order[64:128], in_order[:64], in_order[128:]]), 4) == 0
    assert contiguous_group_size(torch.cat([in_order[:32], in_order[64:], in_order[32:64]]), 4) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_forward_low_precision_dtypes(dtype, tol):
    qw = random_quantized(64, 96, 4, 32, act_order=False, seed=5)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(6)).half()
    layer = QuantLinear.from_quantized(qw, bias=bias)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(7))
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    expected = x.double() @ reference_weight(qw).T + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_without_bias_and_buffers():
    qw = random_quantized(32, 64, 3, -1, act_order=False, seed=8)
    layer = QuantLinear.from_quantized(qw)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (64, 32, 3, -1)
    x = torch.randn(2, 64, dtype=torch.float64)
    before = {name: buffer.clone() for name, buffer in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), x @ reference_weight(qw).T, rtol=1e-12, atol=1e-12)
    after = layer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)  # nothing cached


def test_bias_state_dict_and_repr():
    qw = random_quantized(32, 32, 8, 32, act_order=False, seed=9)
    layer = QuantLinear.from_quantized(qw, bias=torch.ones(32))
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert layer.bias.dtype == torch.float16
    assert "bits=8" in repr(layer) and "group_size=32" in repr(layer)


def test_unpackable_width_is_refused():
    with pytest.raises(QtoolError, match="not a multiple of 32"):
        QuantLinear(in_features=96, out_features=40, bits=4, group_size=32)


# ---- backends: the same QuantLinear through each backend of the registry ----

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
# (backend, bits, group_size, act_order, M, dtype): M = 1 takes the GEMV, 3 and 17 the tl.dot paths, and float32
# the dequantize path of the Triton backend (under TRITON_INTERPRET=1 on a machine without CUDA)
BACKEND_CASES = [
    ("torch", 4, 32, True, 3, torch.bfloat16),
    ("triton", 4, 32, True, 1, torch.float16),
    ("triton", 3, 64, True, 3, torch.bfloat16),
    ("triton", 2, -1, False, 17, torch.float16),
    ("triton", 8, 64, False, 1, torch.bfloat16),
    ("triton", 4, 64, True, 5, torch.float32),
]


def device_for_tests() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def untuned_registry():
    """The default backends, Triton with each M bucket's default plan: on CUDA the tuner would compile every
    candidate of every case (test_gptq_gemm checks each candidate on its own)."""
    from qtool.kernels.registry import BackendRegistry
    from qtool.kernels.torch_backends import GptqTorchBackend
    from qtool.kernels.triton_backend import TritonBackend

    return BackendRegistry(factories={"triton": lambda: TritonBackend(tune=False), "torch": GptqTorchBackend})


@pytest.mark.parametrize("backend,bits,group_size,act_order,m,dtype", BACKEND_CASES)
def test_forward_through_each_backend_matches_reference(backend, bits, group_size, act_order, m, dtype):
    seed = bits * 100 + m
    qw = random_quantized(96, 160, bits, group_size, act_order=act_order, seed=seed)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(seed)).half()
    layer = QuantLinear.from_quantized(qw, bias=bias).to(device_for_tests())
    reason = layer.set_backend(backend, untuned_registry())
    assert reason.startswith(f"{backend}:"), reason
    x = torch.randn(1, m, 160, generator=torch.Generator().manual_seed(seed + 1))
    x_dev = x.to(dtype).to(device_for_tests())
    out = layer(x_dev)
    assert layer.route(x_dev).name == backend
    assert out.shape == (1, m, 96) and out.dtype == dtype
    expected = x.to(dtype).double() @ reference_weight(qw).T + bias.double()
    error = ((out.double().cpu() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[dtype], f"{backend}: relative error {error:.2e}"


def test_backend_form_is_built_once_and_stays_out_of_the_state_dict():
    qw = random_quantized(64, 128, 4, 32, act_order=True, seed=21)
    device = device_for_tests()
    layer = QuantLinear.from_quantized(qw, bias=torch.ones(64)).to(device)
    keys = set(layer.state_dict())
    layer.set_backend("triton", untuned_registry())
    probe = torch.zeros(1, 128, device=device)
    assert layer.route(probe).name == "triton"
    packed = layer.prepared_form(layer.route(probe))
    for m in (1, 1, 3):
        layer(torch.randn(m, 128, dtype=torch.float16, device=device))
    assert layer.prepared_form(layer.route(probe)) is packed  # no repack per call
    assert set(layer.state_dict()) == keys
    assert "backend=triton" in repr(layer)


def test_backend_form_follows_tensors_loaded_after_the_first_forward():
    """The Triton form is a repack (a copy): new tensors copied into the buffers, or buffers replaced, after the
    first forward are served without another set_backend."""
    first = random_quantized(64, 128, 4, 32, act_order=True, seed=22)
    second = random_quantized(64, 128, 4, 32, act_order=True, seed=23)
    device = device_for_tests()
    layer = QuantLinear.from_quantized(first).to(device)
    layer.set_backend("triton", untuned_registry())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(24))
    x_dev = x.half().to(device)

    def assert_serves(qw):
        expected = x.half().double() @ reference_weight(qw).T
        error = ((layer(x_dev).double().cpu() - expected).norm() / expected.norm()).item()
        assert error < TOLERANCE[torch.float16], f"relative error {error:.2e}"

    assert_serves(first)
    # copied in place (load_state_dict copies into the buffers): the form is rebuilt from the new tensors
    layer.load_state_dict(QuantLinear.from_quantized(second).state_dict())
    assert_serves(second)
    # buffers replaced by new tensors
    layer.load_state_dict({k: v.to(device) for k, v in QuantLinear.from_quantized(first).state_dict().items()}, assign=True)
    assert_serves(first)
    assert layer.route(x_dev).name == "triton"


class RefusingBackend:
    """A backend that never serves, to exercise the fallback."""

    name = "fast"

    def supports(self, device, bits, group_size, m=1):
        return "no kernel for this test"


def test_unservable_backend_falls_back_to_torch_with_one_log_line(caplog):
    from qtool.kernels.registry import BackendRegistry
    from qtool.kernels.torch_backends import GptqTorchBackend
    from qtool.kernels.quant_linear import set_model_backend

    registry = BackendRegistry(factories={"fast": RefusingBackend, "torch": GptqTorchBackend}, auto_order={"cpu": ("torch",)})
    model = torch.nn.Sequential(*[QuantLinear.from_quantized(random_quantized(32, 32, 4, 32, False, seed=s)) for s in range(3)])
    with caplog.at_level(logging.INFO, logger="qtool.kernels"):
        chosen = set_model_backend(model, "fast", registry)
        model(torch.randn(4, 32, dtype=torch.float64))
    assert chosen == {"torch": 3}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no kernel for this test" in warnings[0].getMessage()
    x = torch.randn(2, 32, dtype=torch.float64)
    torch.testing.assert_close(model[0](x), x @ reference_weight(random_quantized(32, 32, 4, 32, False, seed=0)).T)


def test_unknown_backend_is_refused():
    with pytest.raises(QtoolError, match="unknown matmul backend 'marlin'"):
        QuantLinear(in_features=64, out_features=32, bits=4, group_size=32, backend="marlin")
    layer = QuantLinear(in_features=64, out_features=32, bits=4, group_size=32)
    with pytest.raises(QtoolError, match="use one of auto, triton, torch"):
        layer.set_backend("cuda")
