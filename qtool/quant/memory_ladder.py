"""What a layer falls back to when the GPU runs out of memory while it is quantized: the layer is redone with one
calibration sample per forward batch, then with the calibration activations in host memory, then on the CPU, each
step logged. The Hessians are sums of per-sample products taken in sample order (layer_quantizer), so batching
does not enter them; moving the activations to the host changes no value. What remains is the layer's forward:
where a sample's output does not depend on the batch it ran in (so on the CPU, tested byte for byte) the redone
layer is the unconstrained one; a GPU library may choose another kernel for another batch shape and differ in
the last bits; the last rung (the CPU) computes on other hardware."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from qtool.core.errors import QtoolError

log = logging.getLogger(__name__)

T = TypeVar("T")
ONE_SAMPLE = 1  # batch token cap that puts each sample in a batch of its own


@dataclass(frozen=True)
class Rung:
    name: str  # how the log says it: "with one sample per batch"
    max_batch_tokens: int | None  # None: the layer runner's default batching
    storage: torch.device  # where the calibration activations live
    compute: torch.device  # where the layer runs


def ladder(compute: torch.device, storage: torch.device) -> list[Rung]:
    """The rungs from the planned way down, those that would change nothing left out."""
    cpu = torch.device("cpu")
    rungs = [Rung("as planned", None, storage, compute), Rung("with one sample per batch", ONE_SAMPLE, storage, compute)]
    if storage.type == "cuda":
        rungs.append(Rung("with the activations in host memory", ONE_SAMPLE, cpu, compute))
    if compute.type == "cuda":
        rungs.append(Rung("on the CPU", ONE_SAMPLE, cpu, cpu))
    return rungs


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def climb_down(rungs: list[Rung], start: int, attempt: Callable[[Rung], T], restore: Callable[[], None], what: str) -> tuple[T, int]:
    """`attempt(rungs[start])`, and on an out-of-memory error `restore()` and the next rung, until one succeeds;
    returns its result and the rung's index (the caller starts the next layer there)."""
    for index in range(start, len(rungs)):
        try:
            return attempt(rungs[index]), index
        except torch.OutOfMemoryError as exc:
            restore()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if index + 1 == len(rungs):
                raise QtoolError(f"{what}: out of memory even {rungs[index].name} ({str(exc).splitlines()[0] if str(exc) else 'no detail'})",
                                 "use fewer --samples or a shorter --seqlen, or a device with more memory") from exc
            log.warning("%s: out of GPU memory %s; redoing it %s", what, rungs[index].name, rungs[index + 1].name)
    raise AssertionError("unreachable: the last rung either returns or raises")
