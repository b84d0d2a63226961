"""A tiny llama whose decoder linears are QuantLinear holding their RTN-quantized weights: a GPTQ-shaped base for
tests that need one without running GPTQ."""

from __future__ import annotations

from torch import nn

from qtool.kernels.quant_linear import QuantLinear
from qtool.quant.rtn import rtn_quantize


def rtn_quantized_llama(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """`model` with every nn.Linear of its decoder layers replaced in place by a QuantLinear of its asymmetric RTN
    quantization (v1 zeros), returned for chaining."""
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            quantized = rtn_quantize(module.weight.detach(), bits, group_size, sym=False).quantized
            parent, _, attribute = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), attribute, QuantLinear.from_quantized(quantized))
    return model
