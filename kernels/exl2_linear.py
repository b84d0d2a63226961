"""Exl2Linear: a drop-in for nn.Linear holding an EXL2 (ExLlamaV2) linear's tensors (q_weight, q_invperm, q_perm,
q_scale, q_scale_max, q_groups, bias). Its matmul runs on the torch reference (dequantize, then F.linear) or the
Triton kernels (kernels/exl2_triton.py): "auto" takes Triton on CUDA; a backend that cannot serve the call falls
back to torch with one log line."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qtool.configs.errors import QtoolError

from qtool.convert.exl2_format import EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, Exl2Weight, check_exl2_layout, exl2_tensors_from_weight, expected_exl2_shapes, weight_from_exl2_tensors
from qtool.kernels.exl2_dequant_ref import dequantize_exl2

logger = logging.getLogger(__name__)
EXL2_BACKENDS = ("auto", "torch", "triton")


def check_exl2_backend(requested: str) -> str:
    if requested not in EXL2_BACKENDS:
        raise QtoolError(f"unknown EXL2 matmul backend {requested!r}", f"use one of {', '.join(EXL2_BACKENDS)}")
    return requested


def _triton_can_serve(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device`, else why not."""
    if device.type == "cuda":
        return None
    from qtool.kernels import exl2_triton

    return None if exl2_triton.triton_interpreted() else f"Triton needs CUDA (or TRITON_INTERPRET=1), not {device.type}"


class Exl2Linear(nn.Module):
    """y = x @ W^T + bias with W in the EXL2 layout; buffers carry the checkpoint's names, shapes and dtypes, so
    the module's state dict is the checkpoint's tensors for the linear. The group layout (bits and rows of each
    group) fixes the buffer shapes, so it is a constructor argument."""

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
        super().__init__()
        check_exl2_layout(in_features, out_features, tuple(group_bits), tuple(group_sizes))
        self.in_features = in_features
        self.out_features = out_features
        self.group_bits = tuple(group_bits)
        self.group_sizes = tuple(group_sizes)
        for name, (shape, dtype) in expected_exl2_shapes(in_features, out_features, self.group_bits, self.group_sizes).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        self.backend = check_exl2_backend(backend)
        self._layout: tuple[Any, Any] | None = None  # (key of the buffers it was built from, Triton compute layout)
        self._fallback_logged = False

    def set_backend(self, requested: str = "auto") -> None:
        self.backend = check_exl2_backend(requested)
        self._layout = None

    def _use_triton(self, device: torch.device) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return False
        why_not = _triton_can_serve(device)
        if why_not is not None and not self._fallback_logged:
            self._fallback_logged = True
            logger.warning("EXL2 matmul backend triton: fallback to torch (%s)", why_not)
        return why_not is None

    def _triton_layout(self) -> Any:
        """The Triton compute form, rebuilt when the buffers moved or were reloaded."""
        from qtool.kernels.exl2_triton import prepare_exl2

        key = (self.q_weight.device, self.q_weight.data_ptr(), self.q_weight._version, self.q_scale._version, self.q_invperm._version)
        if self._layout is None or self._layout[0] != key:
            layout = prepare_exl2(self.q_weight, self.q_invperm, self.q_scale, self.q_scale_max, self.q_groups, self.out_features, self.bias)
            self._layout = (key, layout)
        return self._layout[1]

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QtoolError(f"input has {x.shape[-1]} features, the EXL2 linear expects {self.in_features}")
        if self._use_triton(x.device):
            from qtool.kernels.exl2_triton import exl2_linear_triton

            return exl2_linear_triton(x, self._triton_layout())
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def bits_summary(self) -> str:
        widths = sorted(set(self.group_bits), reverse=True)
        return "/".join(map(str, widths))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, groups={len(self.group_bits)}, "
            f"bits={self.bits_summary()}, bias={self.bias is not None}, backend={self.backend}"
        )
