"""Where the calibration activations wait between decoder layers: on the compute device, in host memory (pinned
when the compute device is a GPU, so that each batch's copy to it is a plain DMA), or in files on disk that are
memory-mapped (the page cache holds what fits; the kernel writes out and drops the rest). The tier comes from the
memory estimate's plan (qtool.models.rules.estimate_peak_memory); the values never depend on it."""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qtool.core.errors import QtoolError
from qtool.models.rules import ACTIVATION_TIERS

log = logging.getLogger(__name__)

ALIGNMENT = 64  # bytes


class ActivationStore:
    """Holds one generation of activations at a time: `store(tensors)` returns them as this tier keeps them; on
    disk each generation is one file (the previous file is deleted, its mapping lives as long as its tensors).
    `close()` (or leaving the `with` block, also on an exception or Ctrl-C) removes the folder on disk."""

    def __init__(self, tier: str, compute: torch.device, folder_beside: Path | None = None, disk_bytes: int = 0):
        """disk_bytes: what the plan expects the disk tier to hold at most; a folder whose file system has less
        free space is refused before any work, not after hours of it."""
        if tier not in ACTIVATION_TIERS:
            raise QtoolError(f"activation tier {tier!r} is not known", "use one of " + ", ".join(ACTIVATION_TIERS))
        self.tier = tier
        self.compute = torch.device(compute)
        self.folder: Path | None = None
        self._generation = 0
        self._file: Path | None = None
        if tier == "disk":
            parent = folder_beside.parent if folder_beside is not None else Path(tempfile.gettempdir())
            name = f".{folder_beside.name}.activations-" if folder_beside is not None else "qtool-activations-"
            check_free_disk(parent, disk_bytes)
            try:
                self.folder = Path(tempfile.mkdtemp(prefix=name, dir=parent))
            except OSError as exc:
                raise QtoolError(f"cannot create the activation folder in {parent}: {exc.strerror or exc}", "choose an output in a folder you can write to") from exc
            # removed at interpreter exit too, should the owner never close it
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @property
    def device(self) -> torch.device:
        """Where stored tensors (and a layer's recorded outputs) live."""
        return self.compute if self.tier == "device" else torch.device("cpu")

    def describe(self) -> str:
        if self.tier == "device":
            return f"on {self.compute}"
        if self.tier == "host":
            return "in pinned host memory" if self._pinned else "in host memory"
        return f"on disk in {self.folder}"

    @property
    def _pinned(self) -> bool:
        return self.compute.type == "cuda" and torch.cuda.is_available()

    def store(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.tier == "device":
            return tuple(t.to(self.compute) for t in tensors)
        if self.tier == "host":
            return tuple(self._host(t) for t in tensors)
        return self._to_disk(tensors)

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._pinned:
            return tensor.to("cpu")
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor)
        return pinned

    def _to_disk(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        assert self.folder is not None
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets = [0]
        for size in sizes:  # each tensor aligned, so that the byte view can be viewed as any dtype
            offsets.append(offsets[-1] + -(-size // ALIGNMENT) * ALIGNMENT)
        self._generation += 1
        file = self.folder / f"activations-{self._generation:05d}.bin"
        mapped = np.memmap(file, dtype=np.uint8, mode="w+", shape=(max(offsets[-1], 1),))
        stored = []
        for tensor, size, offset in zip(tensors, sizes, offsets):
            # the bytes as they are: numpy has no bfloat16, a byte view has every dtype
            view = torch.from_numpy(mapped[offset:offset + size]).view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor.detach().to("cpu"))
            stored.append(view)
        if self._file is not None:
            self._file.unlink(missing_ok=True)  # still mapped by the previous tensors until they are dropped
        self._file = file
        return tuple(stored)

    def close(self) -> None:
        if self.folder is not None:
            self._cleanup()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_free_disk(folder: Path, needed_bytes: int) -> None:
    """QtoolError unless the file system holding `folder` (or its nearest existing parent) has needed_bytes free."""
    if needed_bytes <= 0:
        return
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise QtoolError(
            f"the calibration activations need about {needed_bytes / 2**30:.1f} GiB on disk in {folder}, which has "
            f"{free / 2**30:.1f} GiB free",
            "free space there, write the output on a larger disk, or lower --samples / --seqlen")


def open_store(tier: str, compute: torch.device, folder_beside: Path | None = None,
               disk_bytes: int = 0) -> ActivationStore:
    """The store for `tier`, its place said in one log line. disk_bytes: the plan's figure for the disk tier."""
    store = ActivationStore(tier, compute, folder_beside, disk_bytes)
    log.info("calibration activations kept %s", store.describe())
    return store
