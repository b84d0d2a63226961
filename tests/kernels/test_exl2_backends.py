"""EXL2 linears served through the backend registry (format "exl2"): auto on CPU picks the torch reference and
says why; an explicit triton (the Triton interpreter on CPU) matches the reference on random mixed-width layouts;
a backend that cannot serve falls back with one log line; forms follow moved or reloaded buffers; the checkpoint
loader routes every layer. References are float64 products of the weight the writer was given."""

import logging

import pytest
import torch
from kernel_env import DEVICE

from qtool.core.errors import QtoolError
from qtool.kernels.exl2_triton_backend import Exl2TritonBackend
from qtool.kernels.exl2_linear import Exl2Linear, check_exl2_backend, set_exl2_model_backend
from qtool.kernels.linear_tensors import Exl2LinearTensors
from qtool.kernels.registry import BackendRegistry, default_registry, select_backend
from qtool.kernels.torch_backends import Exl2TorchBackend

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def random_weight(make_random_exl2_layout, make_random_exl2_weight):
    """random_weight(in_features, out_features, seed, layout=None) -> Exl2Weight. Without a layout, a random one
    with at least two widths (so the mixed-width path runs) is drawn first from the weight's generator."""

    def mixed_width_layout(in_features, gen):
        while True:
            layout = make_random_exl2_layout(in_features, gen)
            if len({b for b, _ in layout}) > 1:
                return layout

    def build(in_features, out_features, seed, layout=None):
        gen = torch.Generator().manual_seed(seed)
        return make_random_exl2_weight(layout or mixed_width_layout(in_features, gen), out_features, gen)

    return build


def reference(x, w, bias, dtype):
    """x @ W^T + b in float64, with the weight and bias rounded to dtype as the layer sees them."""
    expected = x.to(dtype).double().cpu() @ w.dequantize(torch.float32).to(dtype).double().T
    return expected if bias is None else expected + bias.to(dtype).double()


def assert_matches(got, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


class RefusingBackend:
    """A backend that never serves, to exercise the fallback."""

    name = "fast"

    def supports(self, device, bits, group_size, m=1):
        return "no kernel for this test"


def test_auto_on_cpu_is_the_torch_reference_and_says_why(random_weight):
    """The Triton interpreter is for tests: auto never picks it on CPU, whatever TRITON_INTERPRET says."""
    backend, reason = select_backend("cpu", (8, 5, 3), (32, 64, 64), m=1, fmt="exl2")
    assert isinstance(backend, Exl2TorchBackend)
    assert reason == "torch: first of torch to serve cpu 8/5/3-bit"
    layer = Exl2Linear.from_weight(random_weight(128, 40, seed=1))
    assert layer.set_backend("auto").startswith("torch: first of torch")
    assert layer.route(torch.zeros(17, 128)).name == "torch"


def test_registries_are_per_format():
    exl2 = default_registry("exl2")
    assert exl2 is default_registry(fmt="exl2") and exl2 is not default_registry()
    assert default_registry() is default_registry("gptq")
    assert isinstance(exl2.get("triton"), Exl2TritonBackend) and exl2.fmt == "exl2"
    with pytest.raises(QtoolError, match="weight format 'awq'"):
        BackendRegistry(fmt="awq")


def test_unknown_backend_name_is_a_user_error(random_weight):
    with pytest.raises(QtoolError, match="unknown matmul backend 'marlin'"):
        check_exl2_backend("marlin")
    w = random_weight(64, 16, seed=2)
    with pytest.raises(QtoolError, match="use one of auto, triton, torch"):
        Exl2Linear(64, 16, w.group_bits, w.group_sizes, backend="marlin")


def test_refused_backend_falls_back_with_one_log_line(caplog, random_weight):
    registry = BackendRegistry(factories={"fast": RefusingBackend, "torch": Exl2TorchBackend},
                               auto_order={"cpu": ("torch",)}, fmt="exl2")
    layout = [(6, 32), (4, 64)]
    weights = [random_weight(96, 24, seed=s, layout=layout) for s in range(3)]
    model = torch.nn.ModuleList([Exl2Linear.from_weight(w) for w in weights])
    with caplog.at_level(logging.INFO, logger="qtool.kernels"):
        chosen = set_exl2_model_backend(model, "fast", registry)
        for layer in model:
            for m in (1, 3, 17):
                assert layer(torch.randn(m, 96, dtype=torch.float64)).shape == (m, 24)
    assert chosen == {"torch": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["EXL2 matmul backend torch: fallback (fast cannot serve cpu 6/4-bit: no kernel for this test)"]
    x = torch.randn(5, 96, dtype=torch.float64)
    for layer, w in zip(model, weights):
        torch.testing.assert_close(layer(x), x @ w.dequantize(torch.float32).double().T, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule without the Triton interpreter")
def test_triton_on_cpu_without_the_interpreter_falls_back(monkeypatch, caplog, random_weight):
    from qtool.kernels import exl2_triton

    monkeypatch.setattr(exl2_triton, "triton_interpreted", lambda: False)
    registry = BackendRegistry(fmt="exl2")  # fresh: the default one logs each fallback once per process
    layer = Exl2Linear.from_weight(random_weight(64, 16, seed=3))
    with caplog.at_level(logging.INFO, logger="qtool.kernels"):
        reason = layer.set_backend("triton", registry)
        layer(torch.randn(2, 64))
    assert reason.startswith("torch: fallback") and "only under TRITON_INTERPRET=1" in reason
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


@pytest.mark.usefixtures("kernels_can_run")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_explicit_triton_matches_the_torch_reference(m, dtype, random_weight):
    w = random_weight(192, 45, seed=10 + m)
    bias = torch.randn(45, generator=torch.Generator().manual_seed(m)).half() if m != 1 else None
    layer = Exl2Linear.from_weight(w, bias).to(DEVICE)
    x = torch.randn(1, m, 192, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    assert layer.set_backend("torch").startswith("torch: requested")
    by_torch = layer(x)
    assert layer.set_backend("triton").startswith("triton: requested")
    assert layer.route(x).name == "triton"
    by_triton = layer(x)
    assert by_triton.dtype == dtype and by_triton.shape == (1, m, 45)
    expected = reference(x, w, bias, dtype)
    assert_matches(by_torch, expected, dtype)
    assert_matches(by_triton, expected, dtype)


@pytest.mark.usefixtures("kernels_can_run")
def test_triton_backend_serves_float64_and_empty_inputs(random_weight):
    """Outside the kernels' dtypes the Triton-dequantized weight goes through torch.matmul: the reference's values."""
    w = random_weight(128, 33, seed=4)
    bias = torch.randn(33, generator=torch.Generator().manual_seed(4)).half()
    layer = Exl2Linear.from_weight(w, bias).to(DEVICE)
    backend = Exl2TritonBackend()
    packed = backend.prepare(Exl2LinearTensors.from_module(layer))
    x = torch.randn(3, 128, dtype=torch.float64).to(DEVICE)
    expected = x.cpu() @ w.dequantize(torch.float32).double().T + bias.double()
    torch.testing.assert_close(backend.matmul(x, packed).cpu(), expected, rtol=1e-12, atol=1e-12)
    assert backend.matmul(x[:0], packed).shape == (0, 33)


@pytest.mark.usefixtures("kernels_can_run")
def test_forms_are_built_once_and_follow_reloaded_buffers(random_weight):
    first = random_weight(128, 40, seed=5)
    layer = Exl2Linear(128, 40, first.group_bits, first.group_sizes).to(DEVICE)
    keys = set(layer.state_dict())
    layer.load_state_dict(Exl2Linear.from_weight(first).state_dict())
    layer.set_backend("triton")
    x = torch.randn(3, 128, dtype=torch.float16).to(DEVICE)
    packed = layer.prepared_form(layer.route(x))
    for m in (1, 1, 3):
        layer(x[:m])
    assert layer.prepared_form(layer.route(x)) is packed  # no rebuild per call
    assert_matches(layer(x), reference(x, first, None, torch.float16), torch.float16)
    # reloaded in place (load_state_dict copies into the buffers): the form is rebuilt from the new tensors
    same_layout = random_weight(128, 40, seed=7, layout=list(zip(first.group_bits, first.group_sizes)))
    layer.load_state_dict(Exl2Linear.from_weight(same_layout).state_dict())
    assert_matches(layer(x), reference(x, same_layout, None, torch.float16), torch.float16)
    # buffers replaced by new tensors (as a move to another device does)
    layer.load_state_dict({k: v.to(DEVICE) for k, v in Exl2Linear.from_weight(first).state_dict().items()}, assign=True)
    assert_matches(layer(x), reference(x, first, None, torch.float16), torch.float16)
    assert set(layer.state_dict()) == keys and "backend=triton" in repr(layer)


@pytest.mark.usefixtures("kernels_can_run")
def test_loaded_checkpoint_routes_every_layer_through_the_request(tmp_path, make_tiny_llama, caplog, random_weight):
    from qtool.checkpoints.exl2_checkpoint import load_exl2_model, save_exl2_model

    model = make_tiny_llama(seed=11)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    weights = {name: random_weight(m.in_features, m.out_features, seed=20 + i) for i, (name, m) in enumerate(linears.items())}
    save_exl2_model(tmp_path / "q", model, weights)
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with caplog.at_level(logging.INFO, logger="qtool.kernels"):
        by_triton = load_exl2_model(tmp_path / "q", device=DEVICE, dtype=torch.float32, backend="triton")
    summaries = [r.getMessage() for r in caplog.records if "EXL2 matmul backend (requested triton)" in r.getMessage()]
    assert summaries == [f"EXL2 matmul backend (requested triton): {len(weights)} layers -> triton: requested"]
    layers = [m for m in by_triton.modules() if isinstance(m, Exl2Linear)]
    assert layers and all(m.route(torch.zeros(1, m.in_features, device=DEVICE)).name == "triton" for m in layers)
    by_torch = load_exl2_model(tmp_path / "q", device=DEVICE, dtype=torch.float32, backend="torch")
    with torch.no_grad():
        got, expected = by_triton(ids.to(DEVICE)).logits, by_torch(ids.to(DEVICE)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
