"""Which matmul backends each weight format (GPTQ, EXL2) has, as names of factories, and the choice between them
per layer and call shape; a backend that cannot serve falls back to the next one with one log line, never an error.
"torch" (the reference, any device) of both formats is in torch_backends.py; "triton" is triton_backend.py (GPTQ)
and exl2_triton_backend.py (EXL2)."""

from __future__ import annotations

import functools
import importlib
import logging
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

import torch

from qtool.core.errors import QtoolError
# the names live in a torch-free module (the CLI builds --backend from them); re-exported here for the kernels
from qtool.kernels.backend_names import BACKEND_CHOICES, BACKEND_FACTORIES, BACKEND_HELP, EXL2, EXL2_BACKEND_FACTORIES, FORMAT_FACTORIES, GPTQ  # noqa: F401

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """What a matmul backend provides. prepare runs once per layer (load time) and again whenever the layer's
    buffers change (routed_linear.py); matmul on every forward. For GPTQ, bits and group_size are the layer's; for
    EXL2, bits is the tuple of the layer's widths (widest first) and group_size the tuple of its group sizes (EXL2
    groups differ in width and rows)."""

    name: str

    def supports(self, device: torch.device | str, bits: Any, group_size: Any, m: int = 1) -> str | None:
        """None when this backend can serve such a layer, else a short reason why not."""

    def prepare(self, tensors: Any) -> Any:
        """The backend's own form of the layer (the `packed_layer` that matmul takes)."""

    def matmul(self, x: torch.Tensor, packed_layer: Any) -> torch.Tensor:
        """y[..., out_features] = x[..., in_features] @ W^T + bias, in x's dtype."""


# per device type, the backends "auto" tries, best first (every format); the Triton interpreter on CPU is for
# tests, so it serves only an explicit request
AUTO_ORDER = MappingProxyType({"cuda": ("triton", "torch"), "cpu": ("torch",)})
DEFAULT_AUTO_ORDER = ("torch",)


def triton_device_problem(device: torch.device, interpreted: bool) -> str | None:
    """Why qtool's Triton kernels cannot run on `device`, or None. `interpreted`: the kernels were built by the
    Triton interpreter (TRITON_INTERPRET=1 at import), which runs them on the CPU for tests only. bfloat16 tl.dot
    needs Ampere, and older GPUs are not tested."""
    if device.type == "cuda":
        if interpreted:
            return "the kernels were built by the Triton interpreter (TRITON_INTERPRET=1), which is for CPU tests"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "needs a GPU of compute capability 8.0 or newer"
        return None
    if device.type == "cpu":
        return None if interpreted else "on CPU the Triton kernels run only under TRITON_INTERPRET=1"
    return f"device type {device.type} is not supported"


def check_backend_name(requested: str, registry: "BackendRegistry | None" = None) -> str:
    """`requested` if it names a backend of `registry` (without one: of any format) or auto, else a QtoolError
    listing the valid names."""
    names = ("auto", *(registry.factories if registry is not None else BACKEND_CHOICES))
    if requested not in names:
        raise QtoolError(f"unknown matmul backend {requested!r}", f"use one of {', '.join(names)}")
    return requested


def bits_label(bits: Any) -> str:
    """How log lines and reasons name a layer's bits: 4 for a GPTQ layer, 8/5/3 for an EXL2 layer's widths."""
    return "/".join(map(str, bits)) if isinstance(bits, (tuple, list)) else str(bits)


class BackendRegistry:
    """Creates each backend of one weight format once (backends keep state: tuned configs, workspaces) and picks
    one per layer. Without factories, the format's own (FORMAT_FACTORIES)."""

    def __init__(self, factories: Mapping[str, str | Callable[[], Backend]] | None = None,
                 auto_order: Mapping[str, tuple[str, ...]] = AUTO_ORDER, default_order: tuple[str, ...] = DEFAULT_AUTO_ORDER,
                 fmt: str = GPTQ):
        if factories is None:
            if fmt not in FORMAT_FACTORIES:
                raise QtoolError(f"no matmul backends for weight format {fmt!r}", f"formats with backends: {', '.join(FORMAT_FACTORIES)}")
            factories = FORMAT_FACTORIES[fmt]
        self.fmt = fmt
        self.factories = dict(factories)
        self.auto_order = dict(auto_order)
        self.default_order = tuple(default_order)
        self._instances: dict[str, Backend] = {}
        self._logged: set[tuple] = set()

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

    def _why_not(self, name: str, device: torch.device, bits: Any, group_size: Any, m: int) -> str | None:
        try:
            return self.get(name).supports(device, bits, group_size, m)
        except QtoolError:
            raise
        except Exception as exc:  # e.g. triton missing or broken: a fallback reason, not a crash
            return f"could not be loaded ({type(exc).__name__}: {exc})"

    def select(self, device: torch.device | str, bits: Any, group_size: Any, m: int = 1,
               requested: str = "auto") -> tuple[Backend, str]:
        """(backend, reason): the requested backend if it can serve the layer, else the next in the device's
        auto order. bits and group_size are the format's (see Backend)."""
        device = torch.device(device)
        if requested != "auto" and requested not in self.factories:
            raise QtoolError(f"unknown matmul backend {requested!r}", f"use auto or one of {', '.join(self.factories)}")
        # the device's order names the backends of every format; this format's are the ones it has
        order = tuple(n for n in self.auto_order.get(device.type, self.default_order) if n in self.factories)
        names = order if requested == "auto" else (requested, *[n for n in order if n != requested])
        layer = f"{device.type} {bits_label(bits)}-bit"
        causes: list[tuple[str, str]] = []  # (backend, why it cannot serve) of each backend passed over
        for name in names:
            why_not = self._why_not(name, device, bits, group_size, m)
            if why_not is None:
                if not causes:
                    reason = f"{name}: requested" if requested == name else f"{name}: first of {', '.join(names)} to serve {layer}"
                    return self.get(name), reason
                reason = f"{name}: fallback ({self._skipped(causes, layer)})"
                self._log_once((requested, device.type, name, *causes), reason)
                return self.get(name), reason
            causes.append((name, why_not))
        raise QtoolError(f"no {self.label} matmul backend can serve a {bits_label(bits)}-bit layer on {device}", self._skipped(causes, layer))

    @staticmethod
    def _skipped(causes: list[tuple[str, str]], layer: str) -> str:
        return "; ".join(f"{name} cannot serve {layer}: {why_not}" for name, why_not in causes)

    @property
    def label(self) -> str:
        """The format as log lines name it: GPTQ, EXL2."""
        return self.fmt.upper()

    def _log_once(self, cause: tuple, reason: str) -> None:
        """Log a fallback the first time its cause (request, device type, chosen backend, why the others could not)
        is seen: layers of other bits falling back for the same reason (an EXL2 model mixes widths) add no line."""
        if cause in self._logged:
            return
        self._logged.add(cause)
        level = logging.WARNING if cause[0] != "auto" else logging.INFO
        logger.log(level, "%s matmul backend %s", self.label, reason)


def default_registry(fmt: str = GPTQ) -> BackendRegistry:
    """The process-wide registry of a weight format, created on first use."""
    return _default_registry(fmt)


@functools.lru_cache(maxsize=None)
def _default_registry(fmt: str) -> BackendRegistry:
    # behind default_registry so that default_registry() and default_registry("gptq") are one cache entry
    return BackendRegistry(fmt=fmt)


def select_backend(device: torch.device | str, bits: Any, group_size: Any, m: int = 1, requested: str = "auto",
                   registry: BackendRegistry | None = None, fmt: str = GPTQ) -> tuple[Backend, str]:
    """(backend, reason) for a layer of `bits`/`group_size` on `device` called with M rows; `registry` or the
    default one of `fmt`."""
    return (registry or default_registry(fmt)).select(device, bits, group_size, m, requested)
