"""Exl2Linear: a drop-in for nn.Linear holding an EXL2 (ExLlamaV2) linear's tensors (q_weight, q_invperm, q_perm,
q_scale, q_scale_max, q_groups, bias); the EXL2 side of RoutedLinear (routing and backend forms live there)."""

from __future__ import annotations

import torch
from torch import nn

from qtool.formats.exl2 import EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, Exl2Weight, check_exl2_layout, exl2_tensors_from_weight, expected_exl2_shapes, weight_from_exl2_tensors
from qtool.kernels.exl2_dequant_ref import dequantize_exl2
from qtool.kernels.linear_tensors import Exl2LinearTensors
from qtool.kernels.quantized_autograd import exl2_layer_grad_input
from qtool.kernels.registry import EXL2, EXL2_BACKEND_FACTORIES, Backend, BackendRegistry
from qtool.kernels.routed_linear import RoutedLinear, set_backends_of

EXL2_BACKENDS = ("auto", *EXL2_BACKEND_FACTORIES)  # what an EXL2 linear accepts as its backend


def check_exl2_backend(requested: str, registry: BackendRegistry | None = None) -> str:
    """`requested` if the EXL2 registry (or `registry`) has such a backend, or auto; else a QtoolError."""
    return Exl2Linear.check_backend(requested, registry)


class Exl2Linear(RoutedLinear):
    """y = x @ W^T + bias with W in the EXL2 layout; buffers carry the checkpoint's names, shapes and dtypes, so
    the module's state dict is the checkpoint's tensors for the linear. The group layout (bits and rows of each
    group) fixes the buffer shapes, so it is a constructor argument."""

    weight_format = EXL2
    weight_buffer = "q_weight"
    linear_label = "EXL2 linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_bits: tuple[int, ...],
        group_sizes: tuple[int, ...],
        bias: bool = False,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ):
        check_exl2_layout(in_features, out_features, tuple(group_bits), tuple(group_sizes))
        super().__init__(in_features, out_features, backend)
        self.group_bits = tuple(group_bits)
        self.group_sizes = tuple(group_sizes)
        for name, (shape, dtype) in expected_exl2_shapes(in_features, out_features, self.group_bits, self.group_sizes).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes under the name PEFT looks for on a quantized layer to place its adapters beside it
        (an EXL2 linear has no parameter PEFT could read the device from)."""
        return self.q_weight

    @property
    def bit_widths(self) -> tuple[int, ...]:
        """The layer's distinct widths, widest first: what backends are selected by."""
        return tuple(sorted(set(self.group_bits), reverse=True))

    def selection_settings(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.bit_widths, self.group_sizes

    def backend_tensors(self) -> Exl2LinearTensors:
        return Exl2LinearTensors.from_module(self)

    @classmethod
    def from_weight(cls, weight: Exl2Weight, bias: torch.Tensor | None = None) -> "Exl2Linear":
        module = cls(weight.in_features, weight.out_features, weight.group_bits, weight.group_sizes, bias=bias is not None, device=weight.codes.device)
        for name, tensor in exl2_tensors_from_weight(weight).items():
            getattr(module, name).copy_(tensor)
        if bias is not None:
            module.bias.copy_(bias.detach().reshape(-1))
        return module

    def exl2_weight(self) -> Exl2Weight:
        """The unpacked weight these buffers hold."""
        tensors = {name: getattr(self, name) for name in EXL2_TENSOR_SUFFIXES + OPTIONAL_SUFFIXES}
        return weight_from_exl2_tensors(tensors, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_exl2(self.q_weight, self.q_invperm, self.q_scale, self.q_scale_max, self.q_groups, self.out_features, dtype)

    def grad_input(self, grad_output: torch.Tensor, backend: Backend) -> torch.Tensor:
        return exl2_layer_grad_input(self, grad_output, backend)

    def bits_summary(self) -> str:
        return "/".join(map(str, self.bit_widths))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, groups={len(self.group_bits)}, "
            f"bits={self.bits_summary()}, bias={self.bias is not None}, backend={self.backend}"
        )


def set_exl2_model_backend(model: nn.Module, requested: str = "auto", registry: BackendRegistry | None = None) -> dict[str, int]:
    """Route every Exl2Linear of `model` through `requested` and build each backend's form now (once, at load, on
    the layers' current device: call it after moving the model); one log line; returns {backend name: layers}."""
    return set_backends_of(model, Exl2Linear, requested, registry)
