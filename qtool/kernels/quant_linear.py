"""QuantLinear: a drop-in for nn.Linear holding GPTQ-packed tensors (qweight, qzeros, scales, g_idx, bias); the
GPTQ side of RoutedLinear (routing and each backend's form of the layer live there)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from qtool.formats.gptq import (
    check_checkpoint_format,
    check_gptq_layout,
    expected_gptq_shapes,
    gptq_tensors_from_quantized,
)
from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.quantized_autograd import gptq_layer_grad_input
from qtool.kernels.registry import GPTQ, Backend, BackendRegistry, default_registry
from qtool.kernels.routed_linear import RoutedLinear, set_backends_of
from qtool.formats.quantized_weight import QuantizedWeight

logger = logging.getLogger(__name__)


class QuantLinear(RoutedLinear):
    """y = x @ W^T + bias with W stored in the GPTQ layout; buffers have the checkpoint's names, shapes and dtypes,
    so a state dict of this module is the checkpoint's tensors for the linear."""

    weight_format = GPTQ
    weight_buffer = "qweight"
    linear_label = "quantized linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        checkpoint_format: str = "gptq",
        device: torch.device | str | None = None,
        backend: str = "auto",
    ):
        check_gptq_layout(in_features, out_features, bits, group_size)
        check_checkpoint_format(checkpoint_format)
        super().__init__(in_features, out_features, backend)
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        for name, (shape, dtype) in expected_gptq_shapes(in_features, out_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    def selection_settings(self) -> tuple[int, int]:
        return self.bits, self.group_size

    def backend_tensors(self) -> GptqLinearTensors:
        return GptqLinearTensors.from_module(self)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> "QuantLinear":
        module = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, bias=bias is not None, checkpoint_format=checkpoint_format, device=qw.codes.device)
        for name, tensor in gptq_tensors_from_quantized(qw, checkpoint_format).items():
            getattr(module, name).copy_(tensor)
        if bias is not None:
            module.bias.copy_(bias.detach().reshape(-1))
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format, dtype)

    def grad_input(self, grad_output: torch.Tensor, backend: Backend) -> torch.Tensor:
        return gptq_layer_grad_input(self, grad_output, backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, checkpoint_format={self.checkpoint_format}, "
            f"backend={self.backend}"
        )


def set_model_backend(model: nn.Module, requested: str = "auto", registry: BackendRegistry | None = None) -> dict[str, int]:
    """Route every QuantLinear of `model` through `requested` and build each backend's form now (one-time repack
    at load, on the layers' current device); one log line; returns {backend name: layers}."""
    return set_backends_of(model, QuantLinear, requested, registry)


def prefer_cpu_int4(model: nn.Module, registry: BackendRegistry | None = None) -> int:
    """For generation on the CPU (run, serve) with backend auto: every QuantLinear that torch's CPU int4 kernel can
    serve (4-bit, groups of a multiple of 32) goes through it, the others keep their backend; returns how many moved.
    auto alone stays the exact reference (quantize, eval and convert compare against it); generation takes the
    kernel's bfloat16 inputs for a several-fold faster token."""
    registry = registry or default_registry()
    if "cpu-int4" not in registry.factories:
        return 0
    backend = registry.get("cpu-int4")
    moved = 0
    for module in model.modules():
        if (isinstance(module, QuantLinear) and module.backend == "auto" and module.qweight.device.type == "cpu"
                and backend.supports("cpu", module.bits, module.group_size) is None):
            module.set_backend("cpu-int4", registry)
            moved += 1
    if moved:
        logger.info("GPTQ matmul backend for generation on the CPU: %d layers -> cpu-int4 (torch's int4 kernel)", moved)
    return moved
