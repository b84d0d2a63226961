"""Where an engine step's host time goes: nanoseconds per phase (schedule, prepare inputs, forward, sample,
postprocess), summed over steps and kept apart for decode steps (every chunk one token) and the others (prefill or
mixed). Off unless a caller attaches one (Engine.record_phases); a phase ends where the next mark is taken. On CUDA
the forward is queued, not waited for: its GPU time lands in the first phase that reads a result (sample), unless
`synchronize` makes every mark wait for the device (a profile, not a served run)."""

from __future__ import annotations

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
    ns: dict[str, dict[str, int]] = field(default_factory=lambda: {kind: dict.fromkeys(PHASES, 0)
                                                                  for kind in STEP_KINDS})
    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))
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
        self._last = self._now()

    def step_kind(self, decode: bool) -> None:
        self._kind = "decode" if decode else "other"

    def mark(self, phase: str) -> None:
        """`phase` ends now (the time since the previous mark is its)."""
        if self.synchronize and self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        now = self._now()
        self.ns[self._kind][phase] += now - self._last
        self._last = now

    def end(self) -> None:
        self.mark("postprocess")
        self.steps[self._kind] += 1

    def reset(self) -> None:
        for kind in STEP_KINDS:
            self.ns[kind] = dict.fromkeys(PHASES, 0)
            self.steps[kind] = 0

    def per_step_us(self, kind: str = "decode") -> dict[str, float]:
        """Mean microseconds per step of `kind` in each phase, and their total."""
        count = self.steps[kind]
        means = {phase: (self.ns[kind][phase] / count / 1e3 if count else 0.0) for phase in PHASES}
        return {**means, "total": sum(means.values())}
