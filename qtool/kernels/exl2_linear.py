"""Exl2Linear: a drop-in for nn.Linear holding an EXL2 (ExLlamaV2) linear's tensors (q_weight, q_invperm, q_perm,
q_scale, q_scale_max, q_groups, bias). The matmul is served by a backend of qtool.kernels.registry (format "exl2",
backends in kernels/exl2_backends.py) chosen per call shape (device, M): "auto" takes Triton on CUDA and the torch
reference elsewhere; a backend that cannot serve falls back to the next with one log line. Each backend's own form
of the layer is built once and rebuilt when the buffers move or are reloaded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtool.core.errors import QtoolError

from qtool.formats.exl2 import EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, Exl2Weight, check_exl2_layout, exl2_tensors_from_weight, expected_exl2_shapes, weight_from_exl2_tensors
from qtool.kernels.exl2_backends import Exl2LinearTensors
from qtool.kernels.exl2_dequant_ref import dequantize_exl2
from qtool.kernels.registry import EXL2, EXL2_BACKEND_FACTORIES, BackendRegistry, cached_route, check_backend_name, default_registry, set_backends_of

EXL2_BACKENDS = ("auto", *EXL2_BACKEND_FACTORIES)  # what an EXL2 linear accepts as its backend


def check_exl2_backend(requested: str, registry: BackendRegistry | None = None) -> str:
    """`requested` if the EXL2 registry (or `registry`) has such a backend, or auto; else a QtoolError."""
    return check_backend_name(requested, registry or default_registry(EXL2))


def _buffer_version(tensor: torch.Tensor) -> int:
    # inference tensors (created under torch.inference_mode) keep no version counter
    return -1 if tensor.is_inference() else tensor._version


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
        self._registry: BackendRegistry | None = None
        # backend name -> (buffers it was built from, their storage and versions, the backend's form of this
        # layer); not in the state dict
        self._prepared: dict[str, tuple[tuple, tuple, Any]] = {}
        self._routes: dict[tuple[str, int], Any] = {}  # (device, M bucket) -> backend

    @property
    def bit_widths(self) -> tuple[int, ...]:
        """The layer's distinct widths, widest first: what backends are selected by."""
        return tuple(sorted(set(self.group_bits), reverse=True))

    def set_backend(self, requested: str = "auto", registry: BackendRegistry | None = None, warm: bool = True) -> str:
        """Route this layer's matmuls through `requested` (auto, torch, triton), falling back per the registry
        (default: the process-wide EXL2 one). With warm, the backend for M = 1 on the layer's device is chosen and
        its form built now (load time: call it after moving the layer to its device) rather than at the first
        call. Forms follow the buffers by themselves: a move, a cast or a copy into them rebuilds. Returns the
        reason for the M = 1 choice ("" without warm)."""
        self.backend = check_exl2_backend(requested, registry)
        self._registry = registry
        self._prepared.clear()
        self._routes.clear()
        if not warm:
            return ""
        backend, reason = self._select(self.q_weight.device, 1)
        self._packed(backend)
        return reason

    def _select(self, device: torch.device, m: int):
        registry = self._registry or default_registry(EXL2)
        return registry.select(device, self.bit_widths, self.group_sizes, m, self.backend)

    def _buffers_stamp(self) -> tuple[tuple[torch.Tensor, ...], tuple[tuple[int, int], ...]]:
        """The buffers a form is built from, and each one's storage and version: .to(), load_state_dict (assign
        or not) or an in-place copy_ into a buffer change it. The entry keeps the tensors themselves, so a freed
        buffer's address cannot come back as a different buffer's."""
        buffers = tuple(t for t in self._buffers.values() if t is not None)
        return buffers, tuple((t.data_ptr(), _buffer_version(t)) for t in buffers)

    def _packed(self, backend) -> Any:
        """The backend's form of this layer, built once per backend and kept while the buffers are unchanged."""
        buffers, versions = self._buffers_stamp()
        entry = self._prepared.get(backend.name)
        if entry is None or entry[1] != versions or any(a is not b for a, b in zip(entry[0], buffers)):
            entry = (buffers, versions, backend.prepare(Exl2LinearTensors.from_module(self)))
            self._prepared[backend.name] = entry
        return entry[2]

    def route(self, x: torch.Tensor):
        """The backend serving an input shaped like x (chosen once per device and M bucket)."""
        return cached_route(self._routes, x, self._select)

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
        backend = self.route(x)
        return backend.matmul(x, self._packed(backend))

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
    check_exl2_backend(requested, registry)
    return set_backends_of(model, Exl2Linear, requested, registry, "EXL2")
