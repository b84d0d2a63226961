"""LoftQ-style initialisation of QLoRA adapters (lora_init loftq): the factors are the best rank-r approximation of
the quantization error (Eckart-Young, checked against the singular values in float64), and on a tiny RTN-quantized
llama every layer's weight error and the model's logits error against the float model shrink at init; bad settings
are one-line QtoolErrors."""

from __future__ import annotations

import copy

import pytest
import torch
from rtn_llama import rtn_quantized_llama
from torch import nn

from qtool.config.finetune_schema import FinetuneConfig, validate_finetune_config
from qtool.core.errors import QtoolError
from qtool.finetune.loftq_init import loftq_initialize, low_rank_factors
from qtool.finetune.lora_setup import make_lora_model
from qtool.finetune.quantized_lora import QuantizedLoraLinear


@pytest.mark.parametrize("shape, rank, scaling", [((37, 53), 5, 0.7), ((64, 29), 11, 2.0), ((6, 9), 8, 1.0)])
def test_factors_are_the_best_rank_r_approximation(shape, rank, scaling):
    error = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape) + rank))
    a, b = low_rank_factors(error, rank, scaling)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    approximation = scaling * b @ a
    singular = torch.linalg.svdvals(error)
    keep = min(rank, singular.numel())
    # Eckart-Young: the residual of the best rank-r approximation is exactly the trailing singular values
    expected = singular[keep:].square().sum().sqrt()
    assert torch.allclose((error - approximation).norm(), expected, rtol=1e-9, atol=1e-9)
    assert torch.linalg.matrix_rank(approximation).item() == keep
    # the split is even: A's rows and B's columns carry the same norms
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-9, atol=1e-12)


def quantized_copy(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    return rtn_quantized_llama(copy.deepcopy(model), bits, group_size)


def logits_error(model: nn.Module, reference: torch.Tensor, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(tokens).logits.double() - reference).norm().item()


@pytest.mark.parametrize("rank, use_rslora", [(8, False), (4, True)])
def test_loftq_init_shrinks_the_weight_and_output_error(make_tiny_llama, rank, use_rslora):
    float_model = make_tiny_llama(11, initializer_range=0.2)
    quantized = quantized_copy(float_model, bits=3, group_size=32)
    tokens = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = float_model(tokens).logits.double()
    error_quantized = logits_error(quantized, reference, tokens)

    config = FinetuneConfig(method="qlora", rank=rank, alpha=2.0 * rank, use_rslora=use_rslora, lora_init="loftq", loftq_float="x")
    peft_model = make_lora_model(quantized, config, float_reference=float_model)
    layers = [(name, module) for name, module in peft_model.get_base_model().named_modules() if isinstance(module, QuantizedLoraLinear)]
    assert len(layers) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    for name, layer in layers:
        w_float = float_model.get_submodule(name).weight.double()
        w_quant = layer.base_layer.dequantized_weight(torch.float64)
        delta = layer.get_delta_weight("default").double()
        assert (w_float - w_quant - delta).norm() < 0.95 * (w_float - w_quant).norm(), name
    error_loftq = logits_error(peft_model, reference, tokens)
    assert error_loftq < 0.95 * error_quantized, (error_loftq, error_quantized)

    # the adapters still train: A and B both get gradients (default init's B = 0 gives A none at the first step)
    peft_model(tokens, labels=tokens).loss.backward()
    name, layer = layers[0]
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_loftq_refusals(make_tiny_llama):
    def errors(**fields):
        return [f.message for f in validate_finetune_config(FinetuneConfig(**fields)) if f.level.name == "ERROR"]

    assert any("loftq" in m for m in errors(method="lora", lora_init="loftq", loftq_float="m"))
    assert any("--loftq-float" in f.fix for f in validate_finetune_config(FinetuneConfig(method="qlora", lora_init="loftq")))
    assert any("valid: default, loftq" in f.fix for f in validate_finetune_config(FinetuneConfig(lora_init="svd")))
    assert validate_finetune_config(FinetuneConfig(method="qlora", use_rslora=True, lora_init="loftq", loftq_float="m")) == []

    float_model = make_tiny_llama(1)
    config = FinetuneConfig(method="qlora", rank=4, lora_init="loftq", loftq_float="m")
    with pytest.raises(QtoolError, match="needs the float model"):
        make_lora_model(quantized_copy(float_model, 4, 32), config)
    other = make_tiny_llama(1, hidden_size=64, head_dim=16, num_attention_heads=4)
    with pytest.raises(QtoolError, match="in the float model and") as raised:
        make_lora_model(quantized_copy(float_model, 4, 32), config, float_reference=other)
    assert "\n" not in str(raised.value)
    with pytest.raises(QtoolError, match="no LoRA layer over a quantized linear"):
        loftq_initialize(float_model, float_model)
