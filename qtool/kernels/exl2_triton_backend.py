"""The Triton matmul backend of EXL2 linears (format "exl2", name "triton"): exl2_triton.py's kernels on CUDA, or
on CPU under TRITON_INTERPRET=1; Triton is imported only when used, so without it the registry falls back to torch."""

from __future__ import annotations

from typing import Any

import torch

from qtool.formats.exl2 import EXL2_BITS
from qtool.kernels.linear_tensors import Exl2LinearTensors, check_input_features
from qtool.kernels.registry import triton_device_problem

# the dtypes the fused kernel multiplies in; others (float64) get the dequantized weight and torch.matmul
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
        check_input_features(x, layout.in_features, "EXL2 linear")
        lead = x.shape[:-1]
        if x.numel() == 0:  # no rows: an empty grid is not a launch
            return x.new_empty(*lead, layout.out_features)
        if x.dtype in KERNEL_DTYPES:
            return exl2_linear_triton(x, layout)
        # the reference computes each value in float32 too, so one cast gives its weight in x's dtype (float64)
        weight_t = exl2_dequantize(layout, torch.float32).to(x.dtype)
        y = torch.matmul(x, weight_t)
        return y if layout.bias is None else y + layout.bias.to(x.dtype)
