"""A quantized linear as an autograd function of its input: the forward is the layer's routed matmul (whatever
backend serves the call shape), the backward dX = dY @ dequant(W) through the format's grad-input kernel where
the forward ran on the Triton backend (a GPU, or the interpreter on request) and the torch reference elsewhere.
The packed buffers are frozen: they get no gradient. What LoRA/QLoRA over GPTQ and EXL2 bases trains through."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from qtool.kernels.grad_input_launch import KERNEL_DTYPES
from qtool.kernels.grad_input_ref import exl2_grad_input_ref, gptq_grad_input_ref


class QuantizedLinearFunction(torch.autograd.Function):
    """y = layer's routed matmul of x; dx = layer.grad_input(dy, backend). Non-tensor arguments (the layer, its
    backend for this call) get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Any, backend: Any) -> torch.Tensor:
        ctx.layer = layer
        ctx.backend = backend
        ctx.x_dtype = x.dtype
        return backend.matmul(x, layer.prepared_form(backend))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad_input = ctx.layer.grad_input(grad_output, ctx.backend)
        return grad_input.to(ctx.x_dtype), None, None


def _kernel_serves(grad_output: torch.Tensor, backend: Any) -> bool:
    """Whether the Triton grad-input kernel runs this backward: where the forward ran on the Triton backend (auto
    picks it on a GPU that can run Triton; the interpreter only on request), in the dtypes the kernel multiplies
    in. A forward on the torch reference gets the reference backward, so the two paths stay comparable."""
    return backend.name == "triton" and grad_output.dtype in KERNEL_DTYPES


class _GptqGradForm:
    """The GPTQ grad-input kernel's form of a layer, kept by RoutedLinear.prepared_form like a backend's."""

    name = "gptq-grad-input"

    @staticmethod
    def prepare(tensors: Any) -> Any:
        from qtool.kernels.gptq_grad_input_triton import prepare_gptq_grad

        return prepare_gptq_grad(tensors)


def gptq_layer_grad_input(layer: Any, grad_output: torch.Tensor, backend: Any) -> torch.Tensor:
    """dX of a QuantLinear for dY = grad_output, in grad_output's dtype: a forward on the dequant backend gets its
    dequantize + matmul (the scratch it read), else see _kernel_serves."""
    if backend.name == "dequant":
        return backend.grad_input(grad_output, layer.prepared_form(backend))
    if _kernel_serves(grad_output, backend):
        from qtool.kernels.gptq_grad_input_triton import gptq_grad_input

        return gptq_grad_input(grad_output, layer.prepared_form(_GptqGradForm))
    return gptq_grad_input_ref(grad_output, layer.backend_tensors())


def exl2_layer_grad_input(layer: Any, grad_output: torch.Tensor, backend: Any) -> torch.Tensor:
    """dX of an Exl2Linear for dY = grad_output, in grad_output's dtype (see _kernel_serves for which path)."""
    if _kernel_serves(grad_output, backend):
        from qtool.kernels.exl2_grad_input_triton import exl2_grad_input

        return exl2_grad_input(grad_output, layer.prepared_form(backend))  # the Triton forward's layout
    return exl2_grad_input_ref(grad_output, layer.backend_tensors())
