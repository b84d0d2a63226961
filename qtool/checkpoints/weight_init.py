"""Building a transformers model whose weights are all about to be loaded: initialising them first only costs time
(about a second for a 135M model, minutes for large ones)."""

from __future__ import annotations

import contextlib
from typing import Any


def skipped_weight_init() -> Any:
    """A context in which transformers builds models without initialising their weights."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:  # initialising costs time, not correctness
            return contextlib.nullcontext()
    return no_init_weights()
