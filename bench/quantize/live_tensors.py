"""Live tensor bytes on the CPU, exactly, op by op: what a run's own thread allocates and still holds, and its peak.

torch.cuda.max_memory_allocated answers this on a GPU; on the CPU nothing does, so the memory estimate's parts
(quant rules' components) could only be checked on the lent GPU. Under LiveTensorBytes every aten op's outputs
are seen (a TorchDispatchMode, after composite ops are decomposed, so temporaries inside isfinite count too);
each new storage (one that none of the op's inputs holds) is counted until Python's storage object is finalized
(storages keep one Python object for their whole life, so the count is exact, views and in-place ops included). Tensors made
before the mode, or on other threads (a read-ahead, a save thread), are not counted: what is measured is the work
of the thread under the mode, which on a GPU is what lives on the GPU.

    with LiveTensorBytes(holders=True) as live:
        ...; live.take_peak()  # the peak since the last take, then restarted from what is live now
        live.peak_holders  # with holders: at the last peak recorded, its live bytes by the op that made them
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _counts(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self, holders: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, the op that made it), until freed
        self._lock = threading.Lock()  # finalizers may run on whichever thread drops the last reference
        # with `holders`: at each new peak (up by 1/64 or more), the live bytes by the op that made them
        self._holders = holders
        self.peak_holders: dict[str, int] = {}
        self._holders_at = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output that shares an input's storage (a view, an in-place op) allocated nothing: that storage is
        # counted already, or was made before the mode and is not this run's
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _counts(t)}
        for tensor in tree_flatten(out)[0]:
            if _counts(tensor) and id(tensor.untyped_storage()) not in inputs:
                self._count(tensor.untyped_storage(), str(func))
        return out

    def _count(self, storage: torch.UntypedStorage, op: str) -> None:
        key, size = id(storage), storage.nbytes()
        with self._lock:
            if key in self._counted or size == 0:
                return
            self._counted[key] = (size, op)
            self.live += size
            self.peak = max(self.peak, self.live)
            if self._holders and self.live >= self._holders_at * 65 // 64 and self.live == self.peak:
                self._holders_at = self.live
                by_op: dict[str, int] = {}
                for held, maker in self._counted.values():
                    by_op[maker] = by_op.get(maker, 0) + held
                self.peak_holders = dict(sorted(by_op.items(), key=lambda item: -item[1]))
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            size, _ = self._counted.pop(key, (0, ""))
            self.live -= size

    def take_peak(self) -> int:
        """The peak of live bytes since the last call (or the start); the next peak starts from what is live now
        (and so do the holders: the next peak's are recorded from it)."""
        with self._lock:
            peak, self.peak = self.peak, self.live
            self._holders_at = 0
        return peak
