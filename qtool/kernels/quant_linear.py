"""QuantLinear: a drop-in for nn.Linear holding GPTQ-packed tensors (qweight, qzeros, scales, g_idx, bias). The
matmul is served by a backend of qtool.kernels.registry chosen per call shape (device, M); each backend's own
form of the layer (e.g. the Triton repack) is built once and kept beside the checkpoint-layout buffers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtool.formats.gptq import (
    check_checkpoint_format,
    check_gptq_layout,
    expected_gptq_shapes,
    gptq_tensors_from_quantized,
)
from qtool.core.errors import QtoolError
from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.registry import BackendRegistry, GptqLinearTensors, cached_route, check_backend_name, default_registry, set_backends_of
from qtool.formats.quantized_weight import QuantizedWeight



class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored in the GPTQ layout; buffers have the checkpoint's names, shapes and dtypes,
    so a state dict of this module is the checkpoint's tensors for the linear."""

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
        super().__init__()
        check_gptq_layout(in_features, out_features, bits, group_size)
        check_checkpoint_format(checkpoint_format)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        for name, (shape, dtype) in expected_gptq_shapes(in_features, out_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        self.backend = check_backend_name(backend)
        self._registry: BackendRegistry | None = None
        # backend name -> (device the form was built on, the backend's form of this layer); not in the state dict
        self._prepared: dict[str, tuple[str, Any]] = {}
        self._routes: dict[tuple[str, int], Any] = {}  # (device, M bucket) -> backend

    def set_backend(self, requested: str = "auto", registry: BackendRegistry | None = None, warm: bool = True) -> str:
        """Route this layer's matmuls through `requested` (auto, torch, triton, ...), falling back per the registry.
        With warm, the backend for M = 1 on the layer's device is chosen and its form built now (load time) rather
        than at the first call. Call it again after loading new tensors into the buffers (a form built earlier
        would keep the old ones); a move to another device is noticed and rebuilt by itself. Returns the reason."""
        self.backend = check_backend_name(requested, registry)
        self._registry = registry
        self._prepared.clear()
        self._routes.clear()
        if not warm:
            return ""
        backend, reason = self._select(self.qweight.device, 1)
        self._packed(backend)
        return reason

    def _select(self, device: torch.device, m: int):
        return (self._registry or default_registry()).select(device, self.bits, self.group_size, m, self.backend)

    def _packed(self, backend) -> Any:
        """The backend's form of this layer, built once per backend and device (buffers may have moved since)."""
        device = str(self.qweight.device)
        entry = self._prepared.get(backend.name)
        if entry is None or entry[0] != device:
            entry = (device, backend.prepare(GptqLinearTensors.from_module(self)))
            self._prepared[backend.name] = entry
        return entry[1]

    def route(self, x: torch.Tensor):
        """The backend serving an input shaped like x (chosen once per device and M bucket)."""
        return cached_route(self._routes, x, self._select)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QtoolError(f"input has {x.shape[-1]} features, the quantized linear expects {self.in_features}")
        backend = self.route(x)
        return backend.matmul(x, self._packed(backend))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, checkpoint_format={self.checkpoint_format}, "
            f"backend={self.backend}"
        )


def set_model_backend(model: nn.Module, requested: str = "auto", registry: BackendRegistry | None = None) -> dict[str, int]:
    """Route every QuantLinear of `model` through `requested` and build each backend's form now (one-time repack
    at load, on the layers' current device); one log line; returns {backend name: layers}."""
    check_backend_name(requested, registry)
    return set_backends_of(model, QuantLinear, requested, registry, "GPTQ")
