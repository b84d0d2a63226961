"""A quantization run held to a GPU memory budget (`qtool quantize --gpu-memory 12GB`): for the run, torch's
caching allocator on the compute device refuses to hold more than the budget (its per-process memory fraction),
so the memory plan (models/rules.py: device_free_memory reads the fraction) chooses where the activations live
for the budget, and a layer that still outgrows it goes down the memory ladder (quant/memory_ladder.py) as it
would on a card of that size. The previous fraction is put back when the run ends, however it ends."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from qtool.core.errors import QtoolError
from qtool.models.rules import cuda_index

log = logging.getLogger(__name__)


def check_gpu_budget(budget_bytes: int | None, device: torch.device) -> None:
    """A one-line error when a budget is given for a run that does not compute on a CUDA device."""
    if budget_bytes is not None and device.type != "cuda":
        raise QtoolError(f"--gpu-memory applies to a CUDA compute device, and this run computes on {device}",
                         "drop --gpu-memory, or add --device cuda")


@contextmanager
def gpu_memory_budget(device: torch.device, budget_bytes: int | None) -> Iterator[float | None]:
    """Within the block, this process holds at most `budget_bytes` of `device`'s memory (None: no budget). Yields the
    allocator fraction set (None without a budget); a budget at or above the card's memory sets none."""
    if budget_bytes is None:
        yield None
        return
    check_gpu_budget(budget_bytes, device)
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = budget_bytes / total
    if fraction >= 1.0:
        log.info("--gpu-memory %.1f GB is not below the card's %.1f GB: no budget set", budget_bytes / 1e9, total / 1e9)
        yield None
        return
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
    previous = get_fraction(index) if get_fraction is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    log.info("GPU memory budget %.2f GB of the card's %.1f GB", budget_bytes / 1e9, total / 1e9)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, index)
