"""LoftQ-style LoRA initialisation on a quantized base (`lora_init: loftq`): each adapter starts as the best rank-r
approximation of its layer's quantization error, scaling * B @ A = truncated SVD of W_float - dequant(W_quantized),
so training begins from a model closer to the float one instead of from the quantized one. The quantized base is
kept as it is (no re-quantization: the GPTQ/EXL2 checkpoint stays the frozen base), which is LoftQ's one-iteration
case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.finetune.quantized_lora import QuantizedLoraLinear


@dataclass
class LoftqLayer:
    name: str
    error_before: float  # ||W_float - W_quantized||_F / ||W_float||_F
    error_after: float  # the same with the adapter's scaling * B @ A added to W_quantized


@dataclass
class LoftqReport:
    layers: list[LoftqLayer] = field(default_factory=list)

    def mean_error(self, which: str) -> float:
        values = [getattr(layer, which) for layer in self.layers]
        return sum(values) / len(values) if values else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "mean_error_before": self.mean_error("error_before"),
                "mean_error_after": self.mean_error("error_after")}


def low_rank_factors(error: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rank, in] and B [out, rank] with scaling * B @ A the best rank-`rank` approximation of `error` [out, in]
    (Eckart-Young); the singular values split evenly between the two so that neither factor starts much larger
    than the other (their gradients scale with each other's size). Computed in float64."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    keep = min(rank, s.numel())
    root = (s[:keep] / scaling).sqrt()
    a = torch.zeros(rank, error.shape[1], dtype=torch.float64)
    b = torch.zeros(error.shape[0], rank, dtype=torch.float64)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a, b


def _float_weight(float_model: nn.Module, name: str) -> torch.Tensor:
    try:
        module = float_model.get_submodule(name)
    except AttributeError:
        module = None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise QtoolError(f"loftq_float: the float model has no linear '{name}' to take the quantization error from",
                         "name the float model this quantized base was made from")
    return weight


def loftq_initialize(peft_model: nn.Module, float_model: nn.Module, adapter: str = "default") -> LoftqReport:
    """Set every quantized LoRA layer's adapter `adapter` of `peft_model` to the truncated SVD of its quantization
    error against the same-named linear of `float_model` (the float model the base was quantized from), in place.
    Returns each layer's relative weight error before and after."""
    report = LoftqReport()
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name, layer in base.named_modules():
        if not isinstance(layer, QuantizedLoraLinear) or adapter not in layer.lora_A:
            continue
        quantized = layer.base_layer.dequantized_weight(torch.float64)
        reference = _float_weight(float_model, name).detach().to(device=quantized.device, dtype=torch.float64)
        if reference.shape != quantized.shape:
            raise QtoolError(f"loftq_float: linear '{name}' is {tuple(reference.shape)} in the float model and "
                             f"{tuple(quantized.shape)} in the quantized base", "name the float model this quantized base was made from")
        error = reference - quantized
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scaling = layer.scaling[adapter]
        a, b = low_rank_factors(error.cpu(), lora_a.shape[0], scaling)
        with torch.no_grad():
            lora_a.copy_(a.to(lora_a.device, lora_a.dtype))
            lora_b.copy_(b.to(lora_b.device, lora_b.dtype))
        residual = error - scaling * (lora_b.double() @ lora_a.double())
        norm = reference.norm().item() or 1.0
        report.layers.append(LoftqLayer(name, error.norm().item() / norm, residual.norm().item() / norm))
    if not report.layers:
        raise QtoolError("lora_init loftq found no LoRA layer over a quantized linear", "loftq initialises QLoRA on a GPTQ/EXL2 base")
    return report
