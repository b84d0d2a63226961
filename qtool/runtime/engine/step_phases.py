"""Where an engine step's host time goes: nanoseconds per phase (schedule, prepare inputs, forward, sample,
postprocess), summed over steps and kept apart for decode steps (every chunk one token) and the others (prefill or
mixed). Off unless a caller attaches one (Engine.record_phases); a phase ends where the next mark is taken. On CUDA
the forward is queued, not waited for: its GPU time lands in the first phase that reads a result (sample), unless
`synchronize` makes every mark wait for the device (a profile, not a served run)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")
STEP_KINDS = ("decode", "other")
CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


@dataclass
class StepPhases:
    synchronize: bool = False  # wait for the device at every mark (CUDA): each phase then owns its GPU time
    # "wall" (perf_counter), or "thread" (this thread's CPU time: on a shared CPU, other processes' load stays out;
    # on CUDA it misses the time spent waiting for the device)
    clock: str = "wall"
    # kind -> phase -> nanoseconds of each step of that kind
    ns: dict[str, dict[str, list[int]]] = field(default_factory=lambda: {kind: {phase: [] for phase in PHASES}
                                                                        for kind in STEP_KINDS})
    _step: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    _last: int = 0
    _kind: str = "other"
    _device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock {self.clock!r} is not one of {', '.join(CLOCKS)}")
        self._now = CLOCKS[self.clock]

    def begin(self, device: torch.device | None = None) -> None:
        """A step starts now."""
        self._device = device
        self._kind = "other"
        self._step = dict.fromkeys(PHASES, 0)
        self._last = self._now()

    def step_kind(self, decode: bool) -> None:
        self._kind = "decode" if decode else "other"

    def mark(self, phase: str) -> None:
        """`phase` ends now (the time since the previous mark is its)."""
        if self.synchronize and self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        now = self._now()
        self._step[phase] += now - self._last
        self._last = now

    def end(self) -> None:
        self.mark("postprocess")
        for phase, ns in self._step.items():
            self.ns[self._kind][phase].append(ns)

    def steps(self, kind: str = "decode") -> int:
        return len(self.ns[kind]["schedule"])

    def per_step_us(self, kind: str = "decode", statistic: str = "median") -> dict[str, float]:
        """Microseconds per step of `kind` in each phase ("median" or "mean" over the steps), and their sum."""
        summary = {"median": statistics.median, "mean": statistics.fmean}[statistic]
        values = {phase: (summary(ns) / 1e3 if ns else 0.0) for phase, ns in self.ns[kind].items()}
        return {**values, "total": sum(values.values())}
