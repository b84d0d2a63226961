"""GPU timing as the kernels run in a model: calls back to back (captured in one CUDA graph, so no launch gaps),
cycling through enough weight copies that the weights come from device memory, not from the L2 cache. The
kernel tuner and bench/kernels.py both time this way, so the plan the tuner picks is the one the benchmark
measures fastest."""

from __future__ import annotations

import math
from typing import Callable

import torch

L2_DEFEAT_FACTOR = 3  # bytes cycled per timed op: this many times the device's L2
MAX_COPIES = 16


def copies_to_defeat_l2(nbytes: int, device: torch.device, max_copies: int = MAX_COPIES) -> int:
    """How many copies of an operand of nbytes to cycle so that each call reads it from device memory."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(max_copies, math.ceil(L2_DEFEAT_FACTOR * l2_bytes / max(nbytes, 1))))


def time_calls_in_graph(calls: list[Callable[[], object]], target_ms: float = 15.0, replays: int = 7) -> float:
    """Median microseconds per call of `calls` (cycled in order), captured in one CUDA graph and replayed. Each
    call is run once first, outside the capture (compilation, workspace growth)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls * 2:
        call()
    end.record()
    torch.cuda.synchronize()
    estimate_us = max(start.elapsed_time(end) * 1e3 / (2 * len(calls)), 1.0)
    n_calls = min(max(len(calls), math.ceil(target_ms * 1e3 / estimate_us)), 3000)
    n_calls = math.ceil(n_calls / len(calls)) * len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / n_calls)
    del graph
    return sorted(per_call)[len(per_call) // 2]
