"""The matmul backends of EXL2 linears, as qtool.kernels.registry serves them (format "exl2"): "torch", the
reference (dequantize the whole weight, then nn.functional.linear), and "triton", the kernels of exl2_triton.py
(CUDA, or CPU under TRITON_INTERPRET=1 for tests). Triton is imported only when the Triton backend is used, so a
machine without it still serves EXL2 layers through torch (the registry falls back with one log line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import EXL2_BITS
from qtool.kernels.exl2_dequant_ref import dequantize_exl2
from qtool.kernels.registry import triton_device_problem

# the dtypes the fused kernel multiplies in; others (float64) get the dequantized weight and torch.matmul
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Exl2LinearTensors:
    """The EXL2 tensors of one linear, as Exl2Linear holds them (q_perm is left out: argsort(q_invperm) is it)."""

    q_weight: torch.Tensor
    q_invperm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    bias: torch.Tensor | None
    out_features: int

    @property
    def in_features(self) -> int:
        return self.q_invperm.shape[0]

    @classmethod
    def from_module(cls, module: Any) -> "Exl2LinearTensors":
        """Read the buffers and out_features of an Exl2Linear (or anything with the same names)."""
        return cls(module.q_weight, module.q_invperm, module.q_scale, module.q_scale_max, module.q_groups,
                   getattr(module, "bias", None), module.out_features)


def _check_features(x: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise QtoolError(f"input has {x.shape[-1]} features, the EXL2 linear expects {in_features}")


class Exl2TorchBackend:
    """The reference: dequantize the whole weight in x's dtype on every call, then nn.functional.linear."""

    name = "torch"

    def supports(self, device: torch.device | str, bits: Any, group_size: Any, m: int = 1) -> str | None:
        return None

    def prepare(self, tensors: Exl2LinearTensors) -> Exl2LinearTensors:
        return tensors

    def matmul(self, x: torch.Tensor, packed_layer: Exl2LinearTensors) -> torch.Tensor:
        t = packed_layer
        _check_features(x, t.in_features)
        weight = dequantize_exl2(t.q_weight, t.q_invperm, t.q_scale, t.q_scale_max, t.q_groups, t.out_features, x.dtype)
        bias = None if t.bias is None else t.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)


class Exl2TritonBackend:
    """EXL2 matmul through the Triton kernels of exl2_triton.py: the fused kernel (one launch per bit width) up to
    exl2_triton.FUSED_MAX_M rows, the Triton dequantize + torch.matmul above. prepare gathers the permutation, each
    row's group and the float16 scales once; the checkpoint's q_weight is read as stored. Stateless: one instance
    serves every layer."""

    name = "triton"

    def supports(self, device: torch.device | str, bits: Any, group_size: Any, m: int = 1) -> str | None:
        """None when the kernels can serve a layer of these widths on `device`, else why not."""
        device = torch.device(device)
        widths = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
        unknown = [b for b in widths if b not in EXL2_BITS]
        if unknown:
            return f"{'/'.join(map(str, unknown))}-bit groups are not supported ({', '.join(map(str, EXL2_BITS))} are)"
        from qtool.kernels.exl2_triton import triton_interpreted  # imports triton: a failure is a fallback reason

        return triton_device_problem(device, triton_interpreted())

    def prepare(self, tensors: Exl2LinearTensors) -> Any:
        """The layer's Triton compute layout (an exl2_triton.Exl2ComputeLayout)."""
        from qtool.kernels.exl2_triton import prepare_exl2

        t = tensors
        return prepare_exl2(t.q_weight, t.q_invperm, t.q_scale, t.q_scale_max, t.q_groups, t.out_features, t.bias)

    def matmul(self, x: torch.Tensor, packed_layer: Any) -> torch.Tensor:
        """y[..., N] = x[..., K] @ W^T + bias, in x's dtype."""
        from qtool.kernels.exl2_triton import exl2_dequantize, exl2_linear_triton

        layout = packed_layer
        _check_features(x, layout.in_features)
        lead = x.shape[:-1]
        if x.numel() == 0:  # no rows: an empty grid is not a launch
            return x.new_empty(*lead, layout.out_features)
        if x.dtype in KERNEL_DTYPES:
            return exl2_linear_triton(x, layout)
        # the reference computes each value in float32 too, so one cast gives its weight in x's dtype (float64)
        weight_t = exl2_dequantize(layout, torch.float32).to(x.dtype)
        y = torch.matmul(x, weight_t)
        return y if layout.bias is None else y + layout.bias.to(x.dtype)
