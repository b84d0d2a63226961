"""Per-request sampling settings (validated, one-line errors naming the field) and the batched sampler: one
[n, vocab] logits tensor, each row with its own settings and its own seeded torch.Generator; and the log-probabilities
of chosen tokens, for the requests that ask (runtime/token_logprobs.py says of which distribution)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
from qtool.runtime.token_logprobs import MAX_TOP_LOGPROBS, TokenLogprob, valid_top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. The filters apply in this order: repetition penalty, temperature, top-k,
    top-p, min-p; temperature 0 is greedy (argmax after the repetition penalty)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0  # 1 switches nucleus filtering off
    top_k: int = 0  # 0 switches top-k off
    min_p: float = 0.0  # 0 switches min-p off
    repetition_penalty: float = 1.0  # 1 switches it off; applies to prompt and output tokens, as transformers does
    seed: int | None = None  # None: drawn from torch's global generator when the request is added
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence ids
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    ignore_eos: bool = False  # keep going past the model's end-of-sequence ids (benchmarks)
    # None: no logprobs (nothing computed); k: each output token's logprob under the model's own distribution and
    # its k most likely alternatives (0..MAX_TOP_LOGPROBS)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # lists are accepted for convenience and kept as tuples, so params stay hashable and immutable
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "at least 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "0 (greedy) or more")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]; 1 switches it off")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "an int >= 0; 0 switches it off")
        _check(0 <= self.min_p < 1, "min_p", self.min_p, "in [0, 1); 0 switches it off")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "above 0; 1 switches it off")
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "seed", self.seed,
               "an int >= 0 or None")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "token ids >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(self.logprobs is None or valid_top_logprobs(self.logprobs), "logprobs", self.logprobs,
               f"None (off) or an int in 0..{MAX_TOP_LOGPROBS} (alternatives per token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, field: str, value, valid: str) -> None:
    if not ok:
        raise QtoolError(f"sampling parameter {field}={value!r} is invalid", hint=f"{field} must be {valid}")


def request_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The request's own random stream: its draws never depend on which requests share its batch."""
    if seed is None:
        # drawn from the global generator, so torch.manual_seed still makes a whole run reproducible
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator(device=device).manual_seed(seed)


def apply_repetition_penalty(logits: torch.Tensor, contexts: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """transformers' rule: a token already in the context has its logit divided by the penalty when positive and
    multiplied by it when negative."""
    out = logits.clone()
    for row, (context, penalty) in enumerate(zip(contexts, penalties)):
        if penalty == 1.0 or not context:
            continue
        seen = torch.tensor(sorted(set(context)), device=logits.device)
        values = out[row, seen]
        out[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] scaled by temperature with the tokens the filters drop set to -inf; every row keeps at least
    its most likely token. top_k 0, top_p 1 and min_p 0 switch a filter off for that row."""
    logits = logits / temperature.unsqueeze(1)
    vocab = logits.shape[1]
    ordered, order = logits.sort(dim=1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(1)
    drop = rank >= k
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=1)
    # nucleus: keep the most likely tokens until their mass reaches top_p (the token that crosses it stays)
    mass_before = probs.cumsum(dim=1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, ordered)


def _per_row(params: list[SamplingParams], field: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(p, field) for p in params], dtype=dtype, device=device)


def sample(logits: torch.Tensor, params: list[SamplingParams], contexts: list[list[int]],
           generators: list[torch.Generator]) -> list[int]:
    """One token per row of logits [n, V]: row i uses params[i], the token ids in contexts[i] (for the repetition
    penalty) and generators[i]. Non-finite logits are refused: sampling from them would return garbage."""
    tokens = sample_finite(logits, params, contexts, generators)
    if tokens is None:
        bad = sorted({int(r) for r in (~torch.isfinite(logits)).nonzero()[:, 0]})
        raise QtoolError(f"the model produced NaN or infinite logits for batch rows {bad}",
                         hint="the weights or the KV cache overflowed: try float32 or bfloat16, or check the model")
    return tokens


def sample_finite(logits: torch.Tensor, params: list[SamplingParams], contexts: list[list[int]],
                  generators: list[torch.Generator]) -> list[int] | None:
    """sample()'s tokens, or None when a logit is NaN or infinite (the caller says whose). The check and the ids
    reach the host in one copy: the step's only wait for the device."""
    if logits.shape[0] == 0:
        return []
    finite = torch.isfinite(logits).all()
    logits = logits.float()
    penalties = [p.repetition_penalty for p in params]
    if any(penalty != 1.0 for penalty in penalties):
        logits = apply_repetition_penalty(logits, contexts, penalties)
    tokens = logits.argmax(dim=1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        chosen = [params[i] for i in sampled]
        filtered = filter_logits(logits[sampled], _per_row(chosen, "temperature", torch.float32, logits.device),
                                 _per_row(chosen, "top_k", torch.int64, logits.device),
                                 _per_row(chosen, "top_p", torch.float32, logits.device),
                                 _per_row(chosen, "min_p", torch.float32, logits.device))
        probs = filtered.softmax(dim=1)
        # Gumbel-max in its exponential form: argmax(p / E) with E ~ Exp(1) draws from p; each row's noise comes
        # from its own generator, so a request's draw does not depend on its neighbours
        noise = torch.stack([torch.empty(probs.shape[1], device=probs.device).exponential_(generator=generators[i])
                             for i in sampled])
        tokens[sampled] = (probs / noise).argmax(dim=1)
    *ids, all_finite = torch.cat((tokens, finite.reshape(1).to(tokens.dtype))).tolist()
    return ids if all_finite else None


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_counts: list[int]) -> list[TokenLogprob]:
    """Row i's token tokens[i] with its log-probability under log_softmax(logits[i]) (float32, the raw logits: no
    penalty, temperature or filter), and the top_counts[i] most likely tokens of that row with theirs."""
    logprobs = logits.float().log_softmax(dim=1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1))[:, 0].tolist()
    k = min(max(top_counts), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(token, logprob, tuple(zip(ids[row][:count], values[row][:count])))
            for row, (token, logprob, count) in enumerate(zip(tokens, chosen, top_counts))]
