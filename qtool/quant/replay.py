"""Running one decoder layer again and again while its linears are quantized group by group, computing each
part only as often as needed: a module whose output can no longer change (its linears and everything before it
are quantized) is recorded the next time it runs and replayed in the passes after that."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


class StopLayerForward(Exception):
    """Raised from a hook once a pass has seen what it needs; the rest of the layer is skipped."""


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class RecordingModule(nn.Module):
    """Computes the wrapped module and records each output (in call order) for later replay."""

    def __init__(self, module: nn.Module, store_device: torch.device):
        super().__init__()
        self.module = module
        self.store_device = store_device
        self.outputs: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        # layers read attributes of their children (e.g. attention's `is_causal`, `layer_idx`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.module(*args, **kwargs)
        self.outputs.append(_to_device(output, self.store_device))
        return output


class ProjectionRecorder(RecordingModule):
    """A RecordingModule for a child whose output is its last linear's output (e.g. attention and its o_proj):
    instead of computing the child, it applies the (now quantized) linear to that linear's inputs recorded in an
    earlier pass. The first call computes the child for real and checks the shortcut against it; if they differ
    (or the child returns more than a tensor and Nones), every call computes the child."""

    def __init__(self, module: nn.Module, linear: nn.Module, linear_inputs: list[torch.Tensor], store_device: torch.device):
        super().__init__(module, store_device)
        self.linear = [linear]  # a list, so that it is not registered (it is already a child of `module`)
        self.linear_inputs = linear_inputs
        self.shortcut: bool | None = None  # unknown until the first call
        self._template: Any = None  # the child's first output, whose first element the shortcut replaces

    def _projected(self, index: int) -> torch.Tensor:
        linear = self.linear[0]
        return linear(self.linear_inputs[index].to(linear.weight.device))

    def _release_input(self, index: int) -> None:
        # once projected, an input is not read again: the recording grows as the inputs go (a 7B's 128 x 2048
        # tokens: 2 GiB each in bfloat16, not 4 GiB at once)
        self.linear_inputs[index] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        index = len(self.outputs)
        if not self.shortcut or index >= len(self.linear_inputs):
            output = self.module(*args, **kwargs)
            if self.shortcut is None:
                self.shortcut = index < len(self.linear_inputs) and self._matches(output, index)
                if not self.shortcut:
                    self.linear_inputs = []  # every call computes the child: its projection's inputs go unread
        else:
            output = self._with_first(self._template, self._projected(index))
        if self.shortcut and index < len(self.linear_inputs):
            self._release_input(index)
        self.outputs.append(_to_device(output, self.store_device))
        return output

    def _matches(self, output: Any, index: int) -> bool:
        first = output[0] if isinstance(output, tuple) else output
        rest = output[1:] if isinstance(output, tuple) else ()
        if not isinstance(first, torch.Tensor) or any(isinstance(r, torch.Tensor) for r in rest):
            return False
        projected = self._projected(index)
        self._template = output
        return projected.shape == first.shape and projected.dtype == first.dtype and torch.equal(projected, first)

    @staticmethod
    def _with_first(template: Any, first: torch.Tensor) -> Any:
        return (first, *template[1:]) if isinstance(template, tuple) else first


class ReplayModule(nn.Module):
    """Returns the recorded outputs of a module in the order they were recorded, without computing anything."""

    def __init__(self, recorder: RecordingModule):
        super().__init__()
        self.outputs = recorder.outputs
        self.original = [recorder.module]  # a list, so that it is not registered as a child
        self.position = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"][0], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.position >= len(self.outputs):
            raise RuntimeError("replay ran past the recorded outputs: the layer's call order changed between passes")
        output = self.outputs[self.position]
        self.position += 1
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and isinstance(output, torch.Tensor):
            if output.shape[:-1] != x.shape[:-1]:
                raise RuntimeError(f"replayed output {tuple(output.shape)} does not fit input {tuple(x.shape)}")
            return output.to(device=x.device, dtype=x.dtype)
        return output


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


@contextmanager
def swapped_modules(root: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put `replacements` in place of the named submodules for the duration of the block, then restore them.
    Names are applied innermost first, so a child swapped inside a module that is itself replaced by a recorder
    (which runs the original module) is swapped there too: a recorded attention block replays its finished q/k/v
    instead of computing them again."""
    originals: list[tuple[str, nn.Module]] = []
    try:
        for name in sorted(replacements, key=lambda n: -n.count(".")):
            parent, child = _parent(root, name)
            originals.append((name, getattr(parent, child)))
            setattr(parent, child, replacements[name])
        yield
    finally:
        for name, module in reversed(originals):  # outermost first, so each parent path is the original again
            parent, child = _parent(root, name)
            setattr(parent, child, module)
