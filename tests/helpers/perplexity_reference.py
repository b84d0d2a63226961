"""An independent perplexity for the eval tests: float64 log-softmax of each window's logits, the negative
log-likelihood of every next token, no code shared with qtool.eval."""

from __future__ import annotations

import math

import torch


def reference_perplexity(model, ids: list[int], seqlen: int, windows: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens predicted) over the first `windows` whole windows of seqlen ids (all whole windows when
    None); each window predicts its seqlen - 1 next tokens."""
    count = len(ids) // seqlen if windows is None else windows
    total = 0.0
    with torch.no_grad():
        for w in range(count):
            window = torch.tensor(ids[w * seqlen : (w + 1) * seqlen])
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= logp[:-1].gather(1, window[1:, None]).sum().item()
    predicted = count * (seqlen - 1)
    return math.exp(total / predicted), predicted
