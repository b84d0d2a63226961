"""A kernel tuner for tests that times nothing (import it after TRITON_INTERPRET is settled, as the kernels are)."""

from __future__ import annotations

import dataclasses

from qtool.kernels.triton_backend import KernelTuner


@dataclasses.dataclass
class CountingTuner(KernelTuner):
    """Times nothing: records each choose() and 'picks' the last candidate, as if timed at 1 ms."""

    calls: list = dataclasses.field(default_factory=list)

    def choose(self, key, candidates, run, reference, timing_calls=None):
        self.calls.append(key)
        best = candidates[-1]
        self.plans[key], self.timings[key] = best, [(best.describe(), 1.0)]
        return best
