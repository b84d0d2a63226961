"""One request as the engine tracks it: prompt and output token ids, its sampling settings and random stream, its
status, its block table and how many of its tokens already have K/V in the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from qtool.runtime.engine.sampling import SamplingParams
from qtool.runtime.token_logprobs import TokenLogprob


class SequenceStatus(Enum):
    WAITING = "waiting"  # not yet admitted
    RUNNING = "running"  # holds blocks, scheduled every step
    PREEMPTED = "preempted"  # lost its blocks for others; waits to be recomputed from its tokens, nothing lost
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    eos_ids: tuple[int, ...] = ()  # the model's end-of-sequence ids (ignored when params.ignore_eos)
    max_context: int | None = None  # the model's positions: a sequence never grows past them
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id when params.logprobs is set
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # cache block ids, in position order
    num_cached_tokens: int = 0  # leading tokens whose K/V are in the cache blocks
    finish_reason: str | None = None  # "stop" (token or string), "length" or "abort" (dropped by the caller)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without building the whole list (a decode step reads one token)."""
        split = len(self.prompt_ids)
        if start >= split:
            return self.output_ids[start - split : stop - split]
        return self.prompt_ids[start:stop] + self.output_ids[: max(0, stop - split)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens whose K/V the model still has to compute; the last of them yields the next token's logits."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def stops_on(self, token: int) -> bool:
        return token in self.params.stop_token_ids or (not self.params.ignore_eos and token in self.eos_ids)

    def token_limit(self) -> int:
        """The most tokens (prompt + output) this sequence can reach: max_tokens, cut at the model's context."""
        limit = len(self.prompt_ids) + self.params.max_tokens
        return limit if self.max_context is None else min(limit, self.max_context)

    def append_token(self, token: int) -> None:
        """Add a sampled token and finish on a stop token or at the length limit (stop strings are the engine's:
        they need text)."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token)
        if self.stops_on(token):
            self.finish("stop")
        elif self.num_tokens >= self.token_limit():
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = time.perf_counter()
