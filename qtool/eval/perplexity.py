"""Perplexity by the GPTQ protocol: tokenize the joined text once (no special tokens), cut non-overlapping windows
of seqlen tokens, drop the partial tail, report exp(mean token NLL) over every predicted token."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from qtool.core.errors import QtoolError
from qtool.data.text import tokenize_text
from qtool.models.finite_outputs import model_name, non_finite_logits_error

DEFAULT_SEQLEN = 2048
ProgressCallback = Callable[[int, int, str], None]
# window token ids [T] -> logits [T, vocab]: another executor of the same model (the CLI builds the engine's, which
# eval cannot import), in place of the model's own forward
WindowLogits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    seconds: float
    tokens_per_second: float  # predicted tokens per second of model time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exp_or_inf(nll: float) -> float:
    """exp(nll), inf where it overflows a float (a mean NLL above ~709: a broken model, which the caller refuses)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def model_context_length(model: Any) -> int | None:
    """The longest sequence the model's config declares, or None when it declares none."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def choose_seqlen(model: Any, seqlen: int | None) -> int:
    """The protocol's window: 2048 unless the model's context is shorter; an explicit seqlen must fit the model."""
    context = model_context_length(model)
    if seqlen is None:
        return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
    if seqlen < 2:
        raise QtoolError(f"--seqlen {seqlen} is too short", "a window needs at least 2 tokens; 2048 is the standard")
    if context and seqlen > context:
        raise QtoolError(f"--seqlen {seqlen} is longer than the model's context ({context} tokens)", f"use --seqlen {context} or less")
    return seqlen


def cut_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seqlen] windows from the start of ids; the partial last window is dropped and
    `windows` keeps the first n."""
    available = ids.numel() // seqlen
    if available == 0:
        raise QtoolError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}", "pass a longer text or a smaller --seqlen")
    if windows is not None:
        if windows < 1:
            raise QtoolError(f"--windows {windows} must be at least 1", f"the text has {available} windows of {seqlen} tokens")
        if windows > available:
            raise QtoolError(f"--windows {windows} asks for more windows than the text holds ({available} of {seqlen} tokens)", f"use --windows {available} or less, or a smaller --seqlen")
        available = windows
    return ids[: available * seqlen].view(available, seqlen)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def window_nll(model: Any, window: torch.Tensor, window_logits: WindowLogits | None = None) -> float:
    """Summed NLL (float64) of tokens 1..seqlen-1 of one window, each predicted from the tokens before it (by the
    model's forward, or by window_logits when given)."""
    if window_logits is not None:
        logits = window_logits(window)[:-1].float()
    else:
        logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="none")
    return nll.double().sum().item()


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    seqlen: int | None = None,
    windows: int | None = None,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    name: str | None = None,
    window_logits: WindowLogits | None = None,
) -> PerplexityResult:
    """exp(mean NLL) of `model` over the first `windows` windows of `text` (all when None). `seqlen=None` picks
    2048 or the model's context if shorter; `device` defaults to where the model's weights are; `name` (default:
    where the model was loaded from) names it in the error for NaN or infinite logits; `window_logits` computes
    each window's logits instead of the model's forward (the engine's executor: `qtool eval --engine`)."""
    seqlen = choose_seqlen(model, seqlen)
    token_windows = cut_windows(tokenize_text(tokenizer, text), seqlen, windows)
    return perplexity_of_windows(model, token_windows, device=device, progress=progress, name=name,
                                 window_logits=window_logits)


def perplexity_of_windows(
    model: Any,
    windows: torch.Tensor,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    name: str | None = None,
    window_logits: WindowLogits | None = None,
) -> PerplexityResult:
    """Perplexity over already cut [n, seqlen] windows (compare feeds the same windows to every model). A window
    whose NLL is not finite (NaN or infinite logits) raises non_finite_logits_error naming `name`."""
    target = torch.device(device) if device is not None else model_device(model)
    count, seqlen = windows.shape
    total_nll = 0.0
    if progress is not None:
        progress(0, count, "")
    start = time.perf_counter()
    for index in range(count):
        nll = window_nll(model, windows[index].to(target), window_logits)
        if not math.isfinite(nll):  # NaN logits give a NaN loss: never a perplexity
            raise non_finite_logits_error(name or model_name(model))
        total_nll += nll
        if progress is not None:
            predicted = (index + 1) * (seqlen - 1)
            progress(index + 1, count, f"ppl {exp_or_inf(total_nll / predicted):.3f}")
    seconds = time.perf_counter() - start
    tokens = count * (seqlen - 1)
    ppl = exp_or_inf(total_nll / tokens)
    if not math.isfinite(ppl):  # finite logits so far apart that exp(mean NLL) overflows: not a result either
        label = name or model_name(model)
        raise QtoolError(f"the perplexity of {label} overflows (mean NLL {total_nll / tokens:.4g} per token), so no result is given",
                         f"its weights or config are broken: run `qtool validate {label}`")
    return PerplexityResult(
        ppl=ppl,
        windows=count,
        seqlen=seqlen,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else float("inf"),
    )
