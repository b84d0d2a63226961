"""The tensors a model class loads from its weight files (tied copies and buffers left out), read off a model
built on the meta device, and the one error for tensors the files lack."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from qtool.core.errors import QtoolError

# Buffers older checkpoints carry that current transformers models recompute (not an error to find them).
IGNORED_UNEXPECTED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
INCOMPLETE_FILES = "the weight files are incomplete: copy or re-download the model's every weight file, or re-export it"


def tied_weight_pairs(model: nn.Module) -> dict[str, str]:
    """{tied parameter name: the parameter it shares} as transformers ties them for this model and config."""
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers >= 5
        return dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None:
        return {}
    return {f"{names[id(output)]}.weight": f"{names[id(inputs)]}.weight"}


def meta_model(config: Any, trust_remote_code: bool = False) -> nn.Module | None:
    """The causal LM of a transformers config built on the meta device (no memory, no initialisation), without
    its quantization_config; None when transformers cannot build one (the loaders then give their own error)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    from qtool.checkpoints.weight_init import skipped_weight_init

    try:
        if getattr(config, "quantization_config", None) is not None:
            config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
        with torch.device("meta"), skipped_weight_init():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError, OSError, StrictDataclassError):
        # a model class may fail in its own way on a config: the loader that builds it for real reports that
        return None


def expected_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `model` loads from weight files: its state dict (which holds no
    non-persistent buffers) without the tied copies transformers makes from the other side."""
    tied = set(tied_weight_pairs(model))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied}


def missing_tensors_error(model_class: str, missing: list[str]) -> QtoolError | None:
    """The error for tensors a model class expects that the weight files lack (first in sorted order, and the
    count), or None when none is missing."""
    if not missing:
        return None
    first = sorted(missing)[0]
    return QtoolError(f"{first}: {model_class} expects this tensor but the weight files lack it ({len(missing)} missing in all)", INCOMPLETE_FILES)


def missing_tensor_names(model: nn.Module, stored: Iterable[str]) -> list[str] | None:
    """The expected tensors (expected_tensor_shapes) that `stored` lacks; None when the files name a tensor the
    model has no place for: they may follow an older naming that transformers renames on load, which only a load
    (its missing keys) can judge."""
    stored = set(stored)
    known = set(model.state_dict())
    if any(name not in known and not name.endswith(IGNORED_UNEXPECTED_SUFFIXES) for name in stored):
        return None
    return [name for name in expected_tensor_shapes(model) if name not in stored]
