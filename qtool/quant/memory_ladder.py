"""What a layer falls back to when the GPU runs out of memory while it is quantized: the layer is redone with one
calibration sample per forward batch, then with the calibration activations in host memory, then on the CPU, each
step logged. The Hessians are sums of per-sample products taken in sample order (layer_quantizer), so batching
does not enter them; moving the activations to the host changes no value. What remains is the layer's forward:
where a sample's output does not depend on the batch it ran in (so on the CPU, tested byte for byte) the redone
layer is the unconstrained one; a GPU library may choose another kernel for another batch shape and differ in
the last bits; the last rung (the CPU) computes on other hardware.

`LadderRun` is one pass's place on the ladder (GPTQ's pass, EXL2's weighing, measuring and quantizing passes and
its head go through it): the rung it stands on and the store that keeps its activations."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from qtool.core.errors import QtoolError
from qtool.quant.activation_store import ActivationStore, open_store

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
            detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        # Out of the except clause: the error's traceback, which holds the failed attempt's frames and so its GPU
        # tensors, is gone before the cache is emptied and the next rung starts.
        restore()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if index + 1 == len(rungs):
            raise QtoolError(f"{what}: out of memory even {rungs[index].name} ({detail})",
                             "use fewer --samples or a shorter --seqlen, or a device with more memory")
        log.warning("%s: out of GPU memory %s; redoing it %s", what, rungs[index].name, rungs[index + 1].name)
    raise AssertionError("unreachable: the last rung either returns or raises")


class LadderRun:
    """Where one pass stands on the ladder, and the store that keeps its activations. Out of GPU memory, the work
    is redone on the next rung and the pass stays there for the rest of its work. A rung that keeps the
    activations in host memory replaces the store with a host store for good; `rehome(store)` then moves what the
    pass holds into it (the pass knows what that is: one layer's inputs, or every layer's for the weighing pass)."""

    def __init__(self, store: ActivationStore, compute: torch.device, rehome: Callable[[ActivationStore], None]):
        self.store, self.compute = store, torch.device(compute)
        self.rungs = ladder(self.compute, store.device)
        self.index = 0
        self._rehome = rehome

    def climb(self, what: str, work: Callable[[Rung], T], restore: Callable[[], None], batched: bool = True) -> T:
        """`work(rung)` from the pass's rung down until it fits (climb_down). Work that runs no batches of samples
        (`batched` False) skips the rungs that only change the batching: they would redo it unchanged."""
        candidates = [self.index] + [i for i in range(self.index + 1, len(self.rungs))
                                     if batched or (self.rungs[i].storage, self.rungs[i].compute) != (self.rungs[i - 1].storage, self.rungs[i - 1].compute)]

        def attempt(rung: Rung) -> T:
            if rung.storage != self.store.device:
                self.store = open_store("host", self.compute)
                self._rehome(self.store)
            return work(rung)

        result, reached = climb_down([self.rungs[i] for i in candidates], 0, attempt, restore, what)
        self.index = candidates[reached]
        return result
