"""What a value read from JSON (a batch request line, a request body) is, for the checks of its fields: JSON's true
and false arrive as Python bools, which isinstance counts as ints, and Python's json reads NaN and Infinity."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
