"""Backend selection and fallback (one log line, never an error), and that every backend the default registry
hands out computes a QuantLinear's output: checked against a float64 reference."""

import logging
import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.registry import BackendRegistry, default_registry, select_backend
from qtool.kernels.torch_backends import GptqTorchBackend
from qtool.formats.quantized_weight import QuantizedWeight


class FakeBackend:
    """Serves a layer unless why_not(device, bits) names a reason."""

    def __init__(self, name, why_not=None):
        self.name, self.why_not = name, why_not

    def supports(self, device, bits, group_size, m=1):
        return self.why_not(device, bits) if self.why_not else None


def fake_registry(backends, auto_order):
    return BackendRegistry(factories={name: (lambda b=b: b) for name, b in backends.items()}, auto_order=auto_order)


def test_first_backend_that_serves_wins_and_fallback_logs_once(caplog):
    no_3bit = FakeBackend("fast", lambda device, bits: "no 3-bit kernel" if bits == 3 else None)
    plain = FakeBackend("plain")
    registry = fake_registry({"fast": no_3bit, "plain": plain}, {"cuda": ("fast", "plain")})
    backend, reason = registry.select("cuda", 4, 128, m=1)
    assert backend is no_3bit and reason.startswith("fast")
    with caplog.at_level(logging.INFO, logger="qtool.kernels.registry"):
        for _ in range(3):
            backend, reason = registry.select("cuda", 3, 128, m=1)
            assert backend is plain
    assert "no 3-bit kernel" in reason
    assert len(caplog.records) == 1 and "no 3-bit kernel" in caplog.records[0].getMessage()


def test_explicit_request_falls_back_with_a_warning(caplog):
    broken = FakeBackend("fast", lambda device, bits: "no GPU")
    registry = fake_registry({"fast": broken, "plain": FakeBackend("plain")}, {"cpu": ("plain",)})
    with caplog.at_level(logging.INFO, logger="qtool.kernels.registry"):
        backend, reason = registry.select("cpu", 4, 128, requested="fast")
    assert backend.name == "plain" and "no GPU" in reason
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_a_backend_that_fails_to_load_is_skipped(caplog):
    registry = BackendRegistry(
        factories={"missing": "qtool.kernels.no_such_backend:Backend", "torch": "qtool.kernels.torch_backends:GptqTorchBackend"},
        auto_order={"cpu": ("missing", "torch")},
    )
    backend, reason = registry.select("cpu", 4, 128)
    assert isinstance(backend, GptqTorchBackend) and "could not be loaded" in reason


def test_unknown_backend_name_is_a_user_error():
    with pytest.raises(QtoolError, match="unknown matmul backend"):
        select_backend("cpu", 4, 128, requested="marlin")


def test_auto_on_cpu_is_the_torch_reference():
    """The Triton interpreter is for tests: auto never picks it on CPU, whatever TRITON_INTERPRET says."""
    backend, _ = select_backend("cpu", 4, 128, m=1)
    assert backend.name == "torch"


def random_quant_linear(bits, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = 64, 160
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half().float()
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    g_idx = (torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size))[torch.randperm(k, generator=gen)]
    qw = QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), bits, group_size)
    bias = torch.randn(n, generator=gen).half()
    rows = qw.g_idx.long()
    weight64 = scales.double()[rows].T * (codes.double() - zeros.double()[rows].T)
    return QuantLinear.from_quantized(qw, bias=bias, checkpoint_format="gptq"), weight64, bias.double()


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, -1), (8, 64)])
def test_default_registry_backends_match_reference(bits, group_size):
    """Whatever select_backend returns for torch and (where it can run here) triton: matmul of a QuantLinear's
    tensors equals x @ W^T + b computed in float64."""
    layer, weight64, bias64 = random_quant_linear(bits, group_size, seed=bits)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = layer.to(device)
    tensors = GptqLinearTensors.from_module(layer)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(device)
    expected = x.double().cpu() @ weight64.T + bias64
    for requested in ("torch", "triton"):
        backend, _ = select_backend(device, bits, group_size, m=5, requested=requested)
        if backend.name != requested:
            continue  # triton on a CPU without the interpreter: covered by the fallback tests above
        packed = backend.prepare(tensors)
        y = backend.matmul(x, packed)
        assert y.dtype == x.dtype and y.shape == (5, layer.out_features)
        error = ((y.double().cpu() - expected).norm() / expected.norm()).item()
        assert error < 1e-5, f"{requested}: relative error {error:.2e}"
    assert default_registry() is default_registry()
