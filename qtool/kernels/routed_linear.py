"""RoutedLinear: what every quantized linear shares: its matmul routed to a backend of its format's registry per call
shape (device, M bucket), each backend's form of the layer built once and rebuilt whenever the buffers change."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qtool.kernels.linear_tensors import check_input_features
from qtool.kernels.quantized_autograd import QuantizedLinearFunction
from qtool.kernels.registry import Backend, BackendRegistry, check_backend_name, default_registry

logger = logging.getLogger(__name__)


def rows_of(x: torch.Tensor) -> int:
    """M of a call: the rows x holds once flattened to [M, in_features] (at least 1)."""
    return max(x.numel() // max(x.shape[-1], 1) if x.dim() else 1, 1)


def route_bucket(m: int) -> int:
    """Calls are routed per power-of-two bucket of M, so a layer keeps a handful of routes, not one per length."""
    return 1 << max(m - 1, 0).bit_length()


def buffer_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter; inference tensors (created under torch.inference_mode) keep none: -1."""
    return -1 if tensor.is_inference() else tensor._version


class RoutedLinear(nn.Module):
    """A quantized linear, y = x @ W^T + bias, whose matmul a backend of its weight format's registry serves.
    Subclasses register the checkpoint's buffers and describe the format: weight_format (the registry's format),
    weight_buffer (the buffer of packed codes, whose device is the layer's), linear_label (how errors name the
    layer), selection_settings (what backends are selected by), backend_tensors (what a backend's prepare takes)
    and dequantized_weight."""

    weight_format: str
    weight_buffer: str
    linear_label: str

    def __init__(self, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = self.check_backend(backend)
        self._registry: BackendRegistry | None = None
        # backend name -> (buffers it was built from, their storage and versions, the backend's form of this
        # layer); not in the state dict
        self._prepared: dict[str, tuple[tuple, tuple, Any]] = {}
        self._routes: dict[tuple[str, int], Backend] = {}  # (device, M bucket) -> backend

    @classmethod
    def check_backend(cls, requested: str, registry: BackendRegistry | None = None) -> str:
        """`requested` if `registry` (default: the process-wide one of the format) has such a backend, or auto;
        else a QtoolError listing the valid names."""
        return check_backend_name(requested, registry or default_registry(cls.weight_format))

    def selection_settings(self) -> tuple[Any, Any]:
        """(bits, group_size) as the format's backends are selected by (see registry.Backend)."""
        raise NotImplementedError

    def backend_tensors(self) -> Any:
        """The layer's tensors as a backend's prepare takes them (linear_tensors.py)."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [out_features, in_features] in `dtype`."""
        raise NotImplementedError

    def grad_input(self, grad_output: torch.Tensor, backend: Backend) -> torch.Tensor:
        """dX = grad_output @ W, in grad_output's dtype, for a forward that `backend` served (the backward of
        quantized_autograd.QuantizedLinearFunction)."""
        raise NotImplementedError

    def set_backend(self, requested: str = "auto", registry: BackendRegistry | None = None, warm: bool = True) -> str:
        """Route this layer's matmuls through `requested` (auto, torch, triton, ...), falling back per the registry
        (default: the process-wide one of the format). With warm, the backend for M = 1 on the layer's device is
        chosen and its form built now (load time: call it after moving the layer to its device) rather than at the
        first call. Forms follow the buffers by themselves: a move, a cast, a load or a copy into them rebuilds.
        Returns the reason for the M = 1 choice ("" without warm)."""
        self.backend = self.check_backend(requested, registry)
        self._registry = registry
        self._prepared.clear()
        self._routes.clear()
        if not warm:
            return ""
        backend, reason = self._select(getattr(self, self.weight_buffer).device, 1)
        self.prepared_form(backend)
        return reason

    @property
    def registry(self) -> BackendRegistry | None:
        """The registry set_backend was given (None: the process-wide one of the format)."""
        return self._registry

    def release_forms(self) -> None:
        """Drop every backend's form of this layer (a fused layer now serves its matmuls from the same tensors);
        a later call builds the form it needs again."""
        self._prepared.clear()

    def _select(self, device: torch.device, m: int) -> tuple[Backend, str]:
        bits, group_size = self.selection_settings()
        registry = self._registry or default_registry(self.weight_format)
        return registry.select(device, bits, group_size, m, self.backend)

    def _buffers_stamp(self) -> tuple[tuple[torch.Tensor, ...], tuple[tuple[int, int], ...]]:
        """The buffers a form is built from, and each one's storage and version: .to(), a cast, load_state_dict
        (assign or not) or an in-place copy_ into a buffer change it. The entry keeps the tensors themselves, so a
        freed buffer's address cannot come back as a different buffer's."""
        buffers = tuple(t for t in self._buffers.values() if t is not None)
        return buffers, tuple((t.data_ptr(), buffer_version(t)) for t in buffers)

    def prepared_form(self, backend: Backend) -> Any:
        """The backend's form of this layer, built once per backend and kept while the buffers are unchanged."""
        buffers, versions = self._buffers_stamp()
        entry = self._prepared.get(backend.name)
        if entry is None or entry[1] != versions or any(a is not b for a, b in zip(entry[0], buffers)):
            entry = (buffers, versions, backend.prepare(self.backend_tensors()))
            self._prepared[backend.name] = entry
        return entry[2]

    def route(self, x: torch.Tensor) -> Backend:
        """The backend serving an input shaped like x, chosen once per device and M bucket."""
        m = rows_of(x)
        key = (str(x.device), route_bucket(m))
        backend = self._routes.get(key)
        if backend is None:
            backend, _ = self._select(x.device, m)
            self._routes[key] = backend
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_features(x, self.in_features, self.linear_label)
        backend = self.route(x)
        if x.requires_grad and torch.is_grad_enabled():
            # training through a frozen quantized base (LoRA): differentiable in x only; inference takes no detour
            return QuantizedLinearFunction.apply(x, self, backend)
        return backend.matmul(x, self.prepared_form(backend))


def set_backends_of(model: nn.Module, linear_type: type[RoutedLinear], requested: str,
                    registry: BackendRegistry | None = None) -> dict[str, int]:
    """Route every `linear_type` module of `model` through `requested` (its set_backend builds each backend's form
    now, on the layer's current device) and log one line naming the backends chosen for decode (M = 1) and why;
    returns {backend name: layers}."""
    linear_type.check_backend(requested, registry)
    chosen: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, linear_type):
            reason = module.set_backend(requested, registry)
            name = reason.split(":", 1)[0]
            chosen[name] = chosen.get(name, 0) + 1
            reasons.setdefault(name, reason)
    if chosen:
        summary = "; ".join(f"{count} layers -> {reasons[name]}" for name, count in chosen.items())
        logger.info("%s matmul backend (requested %s): %s", linear_type.weight_format.upper(), requested, summary)
    return chosen
