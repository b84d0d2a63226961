"""Every kept regression file replayed through every command that reads its kind (fuzz_property's property),
so a bug the fuzzer once found stays fixed whatever examples a later run draws."""

from __future__ import annotations

import pytest

from fuzz_commands import COMMANDS_OF_KIND
from fuzz_property import check_mutation
from fuzz_regressions import regressions

CASES = [(r, command) for r in regressions() for command in COMMANDS_OF_KIND[r.kind]]


def test_regressions_are_kept():
    assert CASES, "tests/fuzz/regressions/ holds no cases"


@pytest.mark.parametrize("regression, command", CASES, ids=[f"{r.kind}/{r.name}/{c}" for r, c in CASES])
def test_regression_refused_cleanly(originals, regression, command):
    check_mutation(originals, regression.kind, command, regression.mutation)
