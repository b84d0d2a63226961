"""LoRA through PEFT over frozen, packed GPTQ and EXL2 linears: the gradients of A and B through a stack of
quantized layers equal those through the dequantized float weights (float64), with the torch reference backward
and with the Triton grad-input kernels; a few AdamW steps on a tiny GPTQ llama lower the loss (with and without
gradient checkpointing, same gradients); the saved adapter is PEFT's own format and loads with plain peft onto the
dequantized float model with the same logits; bad settings are one-line QtoolErrors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from gptq_reference import random_gptq_codes
from peft import PeftModel, get_peft_model
from rtn_llama import rtn_quantized_llama
from safetensors.torch import load_file
from torch import nn

from qtool.core.errors import QtoolError
from qtool.finetune.quantized_lora import (QuantizedLoraLinear, load_adapter_onto, lora_config_for, resolve_target_modules,
                                           use_training_backend)
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear


def gptq_layer(n, k, bits, group_size, act_order, fmt, seed) -> QuantLinear:
    layer = random_gptq_codes(n, k, bits, group_size, act_order, True, fmt, seed)
    module = QuantLinear(k, n, bits, group_size, bias=True, checkpoint_format=fmt)
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        getattr(module, name).copy_(getattr(layer, name))
    return module


@pytest.fixture
def exl2_layer(make_random_exl2_weight):
    """exl2_layer(n, k, seed) -> an Exl2Linear of four widths (6/4/3/2) with random codes and permutation."""

    def build(n, k, seed) -> Exl2Linear:
        gen = torch.Generator().manual_seed(seed)
        layout = [(6, 32), (4, 32), (3, k - 96), (2, 32)]
        return Exl2Linear.from_weight(make_random_exl2_weight(layout, n, gen))

    return build


@pytest.fixture
def gptq_llama(make_tiny_llama):
    """gptq_llama(seed) -> the tiny llama with every decoder linear RTN-quantized to 4-bit GPTQ, group size 64
    (asymmetric, v1 zeros; 96 and 160 inputs leave partial groups), as QuantLinear."""

    def build(seed=0, bits=4, group_size=64) -> nn.Module:
        return rtn_quantized_llama(make_tiny_llama(seed), bits, group_size)

    return build


def dequantized_twin(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """A copy of `model` whose quantized linears are nn.Linear with W = dequant(packed) (and their bias)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, (QuantLinear, Exl2Linear)):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(torch.float64).to(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias.to(dtype))
            parent, _, attribute = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, attribute, linear)
    return twin.to(dtype)


class Stack(nn.Module):
    """x -> gain -> first -> second: the LoRA gradients of `first` pass through `second`'s base backward. The
    gain is a (frozen) parameter as a model's embeddings are: PEFT reads the model's device from one."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.first = first
        self.second = second

    def forward(self, x):
        return self.second(self.first(x * self.gain))


def lora_gradients(net: nn.Module, x: torch.Tensor, probe: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """{parameter name: gradient} of sum(net(x) * probe) over the LoRA parameters, B made non-zero first (PEFT
    starts B at zero, which would leave A's gradient zero)."""
    config = lora_config_for(net, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", task_type=None)
    peft_model = get_peft_model(net, config)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.to(dtype)
    out = peft_model(x.to(dtype))
    (out * probe.to(out.dtype)).sum().backward()
    grads = {name: param.grad.double() for name, param in peft_model.named_parameters() if param.requires_grad}
    assert grads and all("lora_" in name for name in grads)
    return grads


def assert_gradients_match(quantized: nn.Module, dtype, tolerance, backend="torch"):
    for module in quantized.modules():
        if isinstance(module, (QuantLinear, Exl2Linear)):
            module.set_backend(backend)
    in_features = quantized.first.in_features
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, in_features, generator=gen)
    probe = torch.randn(2, 5, quantized.second.out_features, generator=gen)
    expected = lora_gradients(dequantized_twin(quantized, torch.float64), x, probe, torch.float64)
    got = lora_gradients(quantized, x, probe, dtype)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        error = ((grad - expected[name]).norm() / expected[name].norm()).item()
        assert error < tolerance, (name, error)


@pytest.mark.parametrize("bits,group_size,act_order,fmt", [(2, 32, True, "gptq"), (3, 64, False, "gptq_v2"),
                                                           (4, 64, True, "gptq"), (8, -1, False, "gptq")])
def test_gptq_lora_gradients_equal_dequantized_float64(bits, group_size, act_order, fmt):
    net = Stack(gptq_layer(64, 96, bits, group_size, act_order, fmt, seed=bits),
                gptq_layer(32, 64, bits, group_size, act_order, fmt, seed=bits + 1))
    assert_gradients_match(net, torch.float64, 1e-10)


def test_exl2_lora_gradients_equal_dequantized_float64(exl2_layer):
    net = Stack(exl2_layer(160, 160, seed=1), exl2_layer(45, 160, seed=2))
    assert_gradients_match(net, torch.float64, 1e-10)


@pytest.mark.parametrize("kind", ["gptq", "exl2"])
def test_lora_gradients_through_triton_grad_input_kernels(kind, kernels_can_run, exl2_layer):
    """float32 through the Triton forward and the Triton grad-input kernel (the interpreter on CPU)."""
    if kind == "gptq":
        net = Stack(gptq_layer(64, 96, 4, 32, True, "gptq", seed=7), gptq_layer(32, 64, 3, 32, False, "gptq", seed=8))
    else:
        net = Stack(exl2_layer(160, 160, seed=3), exl2_layer(45, 160, seed=4))
    assert_gradients_match(net, torch.float32, 1e-5, backend="triton")


def test_lora_gradients_through_the_dequant_backend_in_one_function(kernels_can_run):
    """float32 through the dequant backend: base and adapter as one function (kernels/low_rank_autograd.py)."""
    net = Stack(gptq_layer(64, 96, 4, 32, True, "gptq", seed=9), gptq_layer(32, 64, 8, 32, False, "gptq_v2", seed=10))
    assert_gradients_match(net, torch.float32, 1e-5, backend="dequant")
    x = torch.randn(3, 96, requires_grad=True)
    assert "DequantLowRankFunction" in type(net.first(x).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a trainer's autocast over float32 adapters: still one function
        assert "DequantLowRankFunction" in type(net.first(x.bfloat16()).grad_fn).__name__


def test_under_autocast_the_adapters_take_x_in_its_own_dtype(exl2_layer):
    """A trainer's bfloat16 autocast over float32 adapters on a bfloat16 base, unfused (EXL2): x reaches the
    adapters' linears as it is (autocast casts them; a float32 copy of x would be cast straight back), and the
    adapters' gradients still match float64's within bfloat16 rounding."""
    from torch.profiler import profile

    net = Stack(exl2_layer(160, 160, seed=5), exl2_layer(45, 160, seed=6))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 160, generator=gen)
    probe = torch.randn(2, 5, 45, generator=gen)
    expected = lora_gradients(dequantized_twin(net, torch.float64), x, probe, torch.float64)
    peft_model = get_peft_model(net.to(torch.bfloat16), lora_config_for(net, rank=4, alpha=8, dropout=0.0,
                                                                       target_modules="all-linear", task_type=None))
    init = torch.Generator().manual_seed(11)  # lora_gradients' values
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=init) * 0.1)
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    x16 = x.bfloat16()
    with profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        out = peft_model(x16)
    casts_of_x = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == [2, 5, 160]]
    assert casts_of_x == []
    (out.float() * probe).sum().backward()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            error = ((param.grad.double() - expected[name]).norm() / expected[name].norm()).item()
            assert param.grad.dtype == torch.float32 and error < 3e-2, (name, error)


def test_training_backend_moves_only_cuda_layers(gptq_llama):
    model = gptq_llama(seed=3)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    moved = use_training_backend(model)
    on_cuda = [m for m in layers if m.qweight.device.type == "cuda"]
    assert moved == len(on_cuda) and all(m.backend == "dequant" for m in on_cuda)
    assert all(m.backend == "auto" for m in layers if m not in on_cuda)
    if torch.cuda.is_available():
        model.cuda()
        assert use_training_backend(model) == len(layers) and all(m.backend == "dequant" for m in layers)


@pytest.fixture
def kernels_can_run():
    from qtool.kernels import exl2_triton, gptq_gemm_triton

    assert torch.cuda.is_available() or (gptq_gemm_triton.triton_interpreted() and exl2_triton.triton_interpreted())


def token_batch(seed=5, batch=4, length=24, vocab=320):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, tokens, steps, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_steps_lower_the_loss_and_leave_the_base_packed(tmp_path, gptq_llama):
    model = gptq_llama(seed=1)
    packed = [(m, {name: t.clone() for name, t in m.named_buffers()}) for m in model.modules() if isinstance(m, QuantLinear)]
    peft_model = get_peft_model(model, lora_config_for(model, 8, 16, 0.05, "all-linear"))
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == 2 * 7  # every decoder linear of both layers
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    peft_model.train()
    losses = train(peft_model, token_batch(), steps=12)
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(320) = 5.77 nats on a batch it can memorise
    for module, before in packed:
        assert all(torch.equal(getattr(module, name), tensor) for name, tensor in before.items())
    assert all(not torch.equal(m.lora_B["default"].weight, torch.zeros_like(m.lora_B["default"].weight)) for m in wrapped)


def test_gradient_checkpointing_gives_the_same_gradients(gptq_llama):
    def gradients(checkpointing):
        model = gptq_llama(seed=2)
        peft_model = get_peft_model(model, lora_config_for(model, 4, 8, 0.0, ["q_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model.enable_input_require_grads()
        peft_model.train()
        tokens = token_batch(seed=9, batch=2, length=16)
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_saved_adapter_loads_with_peft_onto_the_dequantized_base(tmp_path, gptq_llama):
    model = gptq_llama(seed=3)
    float_base = dequantized_twin(model)
    fresh_quantized = copy.deepcopy(model)
    peft_model = get_peft_model(model, lora_config_for(model, 4, 8, 0.0, "all-linear"))
    peft_model.train()
    train(peft_model, token_batch(seed=4), steps=3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    # PEFT's own files and key names
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    tokens = token_batch(seed=6, batch=2, length=20)
    with torch.no_grad():
        without = float_base(input_ids=tokens).logits  # before from_pretrained wraps float_base in place
        expected = peft_model(input_ids=tokens).logits
        on_float = PeftModel.from_pretrained(float_base, tmp_path / "adapter").eval()(input_ids=tokens).logits
        reloaded = load_adapter_onto(fresh_quantized, tmp_path / "adapter").eval()(input_ids=tokens).logits
    torch.testing.assert_close(on_float, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)
    assert (without - expected).abs().max() > 1e-3  # the adapter changed the logits: the comparison means something


def test_lora_config_errors_are_one_line(gptq_llama):
    model = gptq_llama(seed=0)
    with pytest.raises(QtoolError, match="q_proj") as caught:
        lora_config_for(model, 8, 16, 0.0, ["qproj"])
    assert "\n" not in str(caught.value)
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(dropout=1.0)):
        settings = dict(rank=8, alpha=16, dropout=0.0) | bad
        with pytest.raises(QtoolError, match=next(iter(bad))):
            lora_config_for(model, target_modules="all-linear", **settings)
    with pytest.raises(QtoolError, match="use_dora"):
        lora_config_for(model, 8, 16, 0.0, "all-linear", use_dora=True)
    with pytest.raises(QtoolError, match="adapter_config.json"):
        load_adapter_onto(model, "/nonexistent-adapter")


def test_all_linear_skips_the_head_and_dora_works_on_float_targets(make_tiny_llama):
    float_model = make_tiny_llama(0)
    names = resolve_target_modules(float_model, "all-linear")
    assert set(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    peft_model = get_peft_model(float_model, lora_config_for(float_model, 4, 8, 0.0, "q_proj,v_proj", use_dora=True))
    assert any("lora_magnitude_vector" in name for name, _ in peft_model.named_parameters())


def test_rslora_scaling_and_bfloat16_adapters(gptq_llama):
    model = gptq_llama(seed=4)
    config = lora_config_for(model, 16, 8, 0.1, ["v_proj"], use_rslora=True, lora_dtype="bfloat16")
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)  # PEFT would upcast them to float32
    layers = [m for m in peft_model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(layers) == 2
    for layer in layers:
        assert layer.scaling["default"] == pytest.approx(8 / 16 ** 0.5)
        assert layer.lora_A["default"].weight.dtype == torch.bfloat16
        assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    peft_model.train()
    tokens = token_batch(seed=8, batch=1, length=12)
    loss = peft_model(input_ids=tokens, labels=tokens).loss
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(layer.lora_B["default"].weight.grad is not None for layer in layers)
