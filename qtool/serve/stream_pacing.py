"""How often a streamed reply's text goes out. The event loop and the engine's thread share one GIL, and with many
streams the loop's work per engine step (a wake-up, a chunk and an HTTP write per client) slows the step itself. So
the loop measures its own CPU time per engine step, and while that exceeds a budget (a fraction of the step's wall
time) each stream's text is held for a few steps and sent in one write: the same chunks in fewer writes. A stream's
first text, its end and any error go out at once, so time to first token and completion are never held."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CPU_BUDGET = 0.05  # of each engine step's wall time, the event loop's CPU time that streams may take
MAX_HOLD_S = 0.25  # text is never held back longer than this (a stream updates at least 4 times a second)
SMOOTHING = 0.25  # weight of the newest step in the running averages


@dataclass(eq=False)  # one per model and loop, a set member by identity
class StreamPacer:
    """One model's pacing as its event loop sees it: `steps` counts the engine rounds delivered to the loop,
    `every` is how many of them a stream's text waits for (1: every step, the default while the loop is cheap).
    Touched only on the event loop."""

    cpu_budget: float = CPU_BUDGET
    max_hold_s: float = MAX_HOLD_S
    steps: int = 0
    every: int = 1
    loop_share: float = 0.0  # running average: the loop's CPU time over the wall time between deliveries
    step_s: float = 0.0  # running average of the wall time between deliveries
    held: set[Any] = field(default_factory=set)  # the completions whose text waits for its turn
    _last: tuple[float, float] | None = None  # (wall clock, loop thread's CPU clock) at the last delivery

    def tick(self, now: float, cpu: float) -> None:
        """A delivery of the engine's events arrived: `now` the wall clock, `cpu` the loop thread's CPU clock."""
        self.steps += 1
        last, self._last = self._last, (now, cpu)
        if last is None or now <= last[0]:
            return
        wall = now - last[0]
        share = min((cpu - last[1]) / wall, 1.0)
        first = self.steps == 2
        self.loop_share = share if first else self.loop_share + SMOOTHING * (share - self.loop_share)
        self.step_s = wall if first else self.step_s + SMOOTHING * (wall - self.step_s)
        # hysteresis: one more step held over the budget, one fewer under half of it (holding k+1 steps instead
        # of k cuts the share by at most half, so the two bounds do not make it flip back and forth)
        if self.loop_share > self.cpu_budget:
            self.every += 1
        elif self.loop_share < self.cpu_budget / 2 and self.every > 1:
            self.every -= 1
        longest = max(1, int(self.max_hold_s / self.step_s)) if self.step_s > 0 else 1
        self.every = min(self.every, longest)

    def due(self, woke_at: int) -> bool:
        """Whether a stream last woken at delivery `woke_at` gets its text now."""
        return self.steps - woke_at >= self.every
