"""The fixed time budget of a fuzz run: how many examples each kind gets (QTOOL_FUZZ_EXAMPLES raises it for a
longer local run), derandomized so CI runs the same cases every time, and no example database written."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES_PER_KIND = int(os.environ.get("QTOOL_FUZZ_EXAMPLES", "80"))

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_KIND,
    # derandomize: the same examples on every run (CI must be reproducible); a longer local run with a random
    # seed: QTOOL_FUZZ_RANDOM=1
    derandomize=os.environ.get("QTOOL_FUZZ_RANDOM", "") in ("", "0"),
    database=None,
    # each example runs a whole CLI command (tens of ms, seconds when a mutation makes a loader work): time is
    # bounded by max_examples, not by a per-example deadline that a loaded 2-core CI machine would trip
    deadline=None,
    # the originals are fixed files and mutations are drawn from them: slow generation and large data are
    # expected, and function-scoped fixtures are not used
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
