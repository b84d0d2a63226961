"""A model's outputs are checked before anything is computed from them: NaN or infinite logits are an error that
names the model, never a perplexity, a generated token or a passed conversion check."""

from __future__ import annotations

from typing import Any

import torch

from qtool.core.errors import QtoolError


def model_name(model: Any) -> str:
    """The path or id the model was loaded from (transformers records it), else its class name."""
    return getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__


def non_finite_logits_error(name: str) -> QtoolError:
    return QtoolError(
        f"the logits of {name} hold NaN or infinite values, so no result is given",
        f"its weights or config are broken: run `qtool validate {name}`",
    )


def check_finite_logits(logits: torch.Tensor, name: str) -> None:
    """Raise non_finite_logits_error unless every logit is finite."""
    if not bool(torch.isfinite(logits).all()):
        raise non_finite_logits_error(name)
