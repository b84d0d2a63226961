"""qtool.core.json_values: JSON's true/false (Python bools, ints to isinstance) and NaN/Infinity (which Python's json
reads) are neither numbers nor integers to a request's field checks; what json.loads gives for plain numbers is."""

from __future__ import annotations

import json

import pytest

from qtool.core.json_values import is_int, is_number


@pytest.mark.parametrize("text", ["true", "false", "NaN", "Infinity", "-Infinity", "null", '"3"', "[1]", "{}"])
def test_what_is_not_a_number(text):
    value = json.loads(text)
    assert not is_number(value) and not is_int(value)


@pytest.mark.parametrize("text, integer", [("0", True), ("-7", True), ("12345678901234567890", True), ("0.5", False),
                                          ("-1e-300", False), ("2.0", False), ("1e308", False)])
def test_what_json_reads_as_a_number(text, integer):
    value = json.loads(text)
    assert is_number(value) and is_int(value) == integer
