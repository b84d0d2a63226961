"""Matmul backends for GPTQ linears and the choice between them: "triton" (CUDA, or CPU under TRITON_INTERPRET=1)
and "torch" (the reference, any device). A backend that cannot serve a layer falls back to the next one with
one log line, never an error. Each further backend is one module named in BACKEND_FACTORIES."""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from qtool.configs.errors import QtoolError

logger = logging.getLogger(__name__)


@dataclass
class GptqLinearTensors:
    """The GPTQ tensors and settings of one linear, as QuantLinear holds them."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int
    checkpoint_format: str = "gptq"

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @classmethod
    def from_module(cls, module: Any) -> "GptqLinearTensors":
        """Read the buffers and attributes of a QuantLinear (or anything with the same names)."""
        return cls(module.qweight, module.qzeros, module.scales, module.g_idx, getattr(module, "bias", None),
                   module.bits, module.group_size, module.checkpoint_format)


class Backend(Protocol):
    """What a matmul backend provides. prepare runs once per layer (load time); matmul on every forward."""

    name: str

    def supports(self, device: torch.device | str, bits: int, group_size: int, m: int = 1) -> str | None:
        """None when this backend can serve such a layer, else a short reason why not."""

    def prepare(self, tensors: GptqLinearTensors) -> Any:
        """The backend's own form of the layer (the `packed_layer` that matmul takes)."""

    def matmul(self, x: torch.Tensor, packed_layer: Any) -> torch.Tensor:
        """y[..., out_features] = x[..., in_features] @ W^T + bias, in x's dtype."""


class TorchBackend:
    """The reference: dequantize the whole weight in x's dtype on every call, then nn.functional.linear."""

    name = "torch"

    def supports(self, device: torch.device | str, bits: int, group_size: int, m: int = 1) -> str | None:
        return None

    def prepare(self, tensors: GptqLinearTensors) -> GptqLinearTensors:
        return tensors

    def matmul(self, x: torch.Tensor, packed_layer: GptqLinearTensors) -> torch.Tensor:
        from qtool.kernels.dequant_ref import dequantize_gptq

        t = packed_layer
        weight = dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.checkpoint_format, x.dtype)
        bias = None if t.bias is None else t.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)


# name -> "module:attribute" of a zero-argument factory (imported only when first needed); read-only
BACKEND_FACTORIES = MappingProxyType({
    "triton": "qtool.kernels.triton_backend:TritonBackend",
    "torch": "qtool.kernels.registry:TorchBackend",
})
BACKEND_CHOICES = tuple(BACKEND_FACTORIES)  # what --backend accepts besides "auto"
BACKEND_HELP = "Matmul backend of quantized linears: auto (triton on CUDA, else torch), " + ", ".join(BACKEND_CHOICES) + "."
# per device type, the backends "auto" tries, best first; the Triton interpreter on CPU is for tests, so it
# serves only an explicit request
AUTO_ORDER = MappingProxyType({"cuda": ("triton", "torch"), "cpu": ("torch",)})
DEFAULT_AUTO_ORDER = ("torch",)


def check_backend_name(requested: str, registry: "BackendRegistry | None" = None) -> str:
    """`requested` if it names a backend (or auto), else a QtoolError listing the valid names."""
    names = ("auto", *(registry.factories if registry is not None else BACKEND_CHOICES))
    if requested not in names:
        raise QtoolError(f"unknown matmul backend {requested!r}", f"use one of {', '.join(names)}")
    return requested


class BackendRegistry:
    """Creates each backend once (backends keep state: tuned configs, workspaces) and picks one per layer."""

    def __init__(self, factories: Mapping[str, str | Callable[[], Backend]] = BACKEND_FACTORIES,
                 auto_order: Mapping[str, tuple[str, ...]] = AUTO_ORDER, default_order: tuple[str, ...] = DEFAULT_AUTO_ORDER):
        self.factories = dict(factories)
        self.auto_order = dict(auto_order)
        self.default_order = tuple(default_order)
        self._instances: dict[str, Backend] = {}
        self._logged: set[tuple[str, str]] = set()

    def get(self, name: str) -> Backend:
        if name not in self.factories:
            raise QtoolError(f"unknown matmul backend {name!r}", f"use auto or one of {', '.join(self.factories)}")
        if name not in self._instances:
            factory = self.factories[name]
            if isinstance(factory, str):
                module_name, _, attr = factory.partition(":")
                factory = getattr(importlib.import_module(module_name), attr)
            self._instances[name] = factory()
        return self._instances[name]

    def _why_not(self, name: str, device: torch.device, bits: int, group_size: int, m: int) -> str | None:
        try:
            return self.get(name).supports(device, bits, group_size, m)
        except QtoolError:
            raise
        except Exception as exc:  # e.g. triton missing or broken: a fallback reason, not a crash
            return f"could not be loaded ({type(exc).__name__}: {exc})"

    def select(self, device: torch.device | str, bits: int, group_size: int, m: int = 1,
               requested: str = "auto") -> tuple[Backend, str]:
        """(backend, reason): the requested backend if it can serve the layer, else the next in the device's
        auto order."""
        device = torch.device(device)
        if requested != "auto" and requested not in self.factories:
            raise QtoolError(f"unknown matmul backend {requested!r}", f"use auto or one of {', '.join(self.factories)}")
        order = self.auto_order.get(device.type, self.default_order)
        names = order if requested == "auto" else (requested, *[n for n in order if n != requested])
        skipped: list[str] = []
        for name in names:
            why_not = self._why_not(name, device, bits, group_size, m)
            if why_not is None:
                if not skipped:
                    reason = f"{name}: requested" if requested == name else f"{name}: first of {', '.join(names)} to serve {device.type} {bits}-bit"
                    return self.get(name), reason
                reason = f"{name}: fallback ({'; '.join(skipped)})"
                self._log_once(requested, reason)
                return self.get(name), reason
            skipped.append(f"{name} cannot serve {device.type} {bits}-bit: {why_not}")
        raise QtoolError(f"no matmul backend can serve a {bits}-bit layer on {device}", "; ".join(skipped))

    def _log_once(self, requested: str, reason: str) -> None:
        if (requested, reason) in self._logged:
            return
        self._logged.add((requested, reason))
        level = logging.WARNING if requested != "auto" else logging.INFO
        logger.log(level, "GPTQ matmul backend %s", reason)


@functools.lru_cache(maxsize=1)
def default_registry() -> BackendRegistry:
    """The process-wide registry, created on first use."""
    return BackendRegistry()


def select_backend(device: torch.device | str, bits: int, group_size: int, m: int = 1, requested: str = "auto",
                   registry: BackendRegistry | None = None) -> tuple[Backend, str]:
    """(backend, reason) for a layer of `bits`/`group_size` on `device` called with M rows."""
    return (registry or default_registry()).select(device, bits, group_size, m, requested)
