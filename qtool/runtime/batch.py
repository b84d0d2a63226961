"""Offline batch generation: all requests through one engine (continuous batching, shared prefixes cached), or through
generate one at a time for a model the engine cannot take; outputs in input order with their timings, and totals."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from qtool.core.errors import QtoolError
from qtool.runtime.batch_file import BatchRequest, read_batch_requests, write_jsonl_atomically
from qtool.runtime.engine import Engine, EngineConfig, engine_support
from qtool.runtime.generate import GenerationSettings, generate, prompt_ids, reply_budget
from qtool.runtime.reply import sampling_params
from qtool.runtime.token_logprobs import TokenLogprob, TokenTexts

__all__ = ["BatchOutput", "BatchRequest", "BatchResult", "BatchTotals", "read_batch_requests", "run_batch",
           "write_batch_outputs"]

logger = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]  # (requests finished, requests in all)


@dataclass
class BatchOutput:
    id: str | int
    text: str
    tokens: int  # new tokens, the stop token included when one ended the reply
    finish_reason: str  # "stop" (a stop token or string) or "length"
    time_to_first_token: float  # seconds from the batch's start (queueing included) to the request's first token
    seconds: float  # from the batch's start to the request's finish
    token_ids: list[int]
    # when the request asked: per new token {token_id, token (its text), logprob, top_logprobs [{token_id, token,
    # logprob}]}, the model's own log-softmax (runtime/token_logprobs.py)
    logprobs: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """One line of the outputs file (no ids; logprobs only when asked)."""
        row = {"id": self.id, "text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
               "time_to_first_token": self.time_to_first_token, "seconds": self.seconds}
        if self.logprobs is not None:
            row["logprobs"] = self.logprobs
        return row


@dataclass
class BatchTotals:
    requests: int
    output_tokens: int
    seconds: float  # the whole batch, wall clock
    tokens_per_second: float  # output tokens over the whole batch's seconds
    prefix_hit_requests: int  # requests that found part of their prompt in the prefix cache
    saved_prompt_tokens: int  # prompt tokens those hits did not recompute
    preemptions: int
    backend: str  # "engine", or "transformers" for a model the engine cannot take
    cache_blocks: int | None = None  # the engine's KV cache blocks (None: no engine ran)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BatchResult:
    outputs: list[BatchOutput]  # in input order
    totals: BatchTotals

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": [output.to_dict() for output in self.outputs], "totals": self.totals.to_dict()}


def run_batch(model: Any, tokenizer: Any, requests: list[BatchRequest], defaults: GenerationSettings = GenerationSettings(),
              progress: ProgressCallback | None = None, engine_config: EngineConfig = EngineConfig(),
              draft_model: Any = None, draft_tokenizer: Any = None) -> BatchResult:
    """Generate every request's reply (its own settings over `defaults`); every request is checked before any runs.
    A draft model (engine_config.speculative="draft") drafts for the greedy requests."""
    if not requests:
        raise QtoolError("the batch holds no requests", "give at least one request")
    settings = []
    for request in requests:
        with _naming(request):
            settings.append(request.settings_over(defaults))
            settings[-1].check()
    reason = engine_support(model)
    asking = next((request for request in requests if request.logprobs is not None), None)
    if reason is not None and asking is not None:
        with _naming(asking):
            raise QtoolError(f"logprobs need the engine, and this model runs through transformers' generate: {reason}",
                             "drop the 'logprobs' field, or use a model the engine takes")
    if reason is not None:
        logger.warning("running the batch one request at a time through transformers' generate: %s", reason)
        return _run_with_generate(model, tokenizer, requests, settings, progress)
    prompts, params = [], []
    for request, setting in zip(requests, settings):
        with _naming(request):
            prompts.append(prompt_ids(tokenizer, request.conversation)[0].tolist())
            params.append(replace(sampling_params(setting, reply_budget(model, len(prompts[-1]), setting.max_new_tokens)),
                                  logprobs=request.logprobs))
    engine = Engine(model, tokenizer, engine_config, draft_model, draft_tokenizer)
    texts = TokenTexts(tokenizer)
    start = time.perf_counter()
    index = {}
    for i, (request, prompt, param) in enumerate(zip(requests, prompts, params)):
        with _naming(request):
            index[engine.add_request(prompt, param)] = i
    outputs: list[BatchOutput | None] = [None] * len(requests)
    finished = 0
    while engine.has_unfinished():
        for out in engine.step():
            i = index[out.request_id]
            outputs[i] = BatchOutput(requests[i].id, out.text, len(out.token_ids), out.finish_reason,
                                     out.time_to_first_token_s, out.seconds, out.token_ids,
                                     None if out.logprobs is None else _logprob_rows(out.logprobs, texts))
            finished += 1
            if progress is not None:
                progress(finished, len(requests))
    stats = engine.stats()
    totals = _totals(outputs, time.perf_counter() - start, stats.prefix_hit_requests, stats.saved_prompt_tokens,
                     stats.preemptions, "engine")
    totals.cache_blocks = stats.num_blocks
    return BatchResult(outputs, totals)


def _logprob_rows(entries: list[TokenLogprob], texts: TokenTexts) -> list[dict[str, Any]]:
    def token(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token_id": token_id, "token": texts.text(token_id), "logprob": logprob}

    return [{**token(entry.token_id, entry.logprob), "top_logprobs": [token(t, lp) for t, lp in entry.top]}
            for entry in entries]


def _run_with_generate(model: Any, tokenizer: Any, requests: list[BatchRequest], settings: list[GenerationSettings],
                       progress: ProgressCallback | None) -> BatchResult:
    start = time.perf_counter()
    outputs = []
    for finished, (request, setting) in enumerate(zip(requests, settings), start=1):
        began = time.perf_counter() - start  # timings from the batch's start, as the engine path reports them
        with _naming(request):
            result = generate(model, tokenizer, request.conversation, setting)
        outputs.append(BatchOutput(request.id, result.text, result.tokens, result.finish_reason,
                                   began + result.time_to_first_token, began + result.seconds, result.token_ids))
        if progress is not None:
            progress(finished, len(requests))
    return BatchResult(outputs, _totals(outputs, time.perf_counter() - start, 0, 0, 0, "transformers"))


def _totals(outputs: list[BatchOutput], seconds: float, hits: int, saved: int, preemptions: int, backend: str) -> BatchTotals:
    tokens = sum(output.tokens for output in outputs)
    return BatchTotals(len(outputs), tokens, seconds, tokens / seconds if seconds > 0 else float("inf"), hits, saved,
                       preemptions, backend)


@contextmanager
def _naming(request: BatchRequest) -> Iterator[None]:
    """A QtoolError raised inside is re-raised naming the request (and its line)."""
    try:
        yield
    except QtoolError as exc:
        where = f" (line {request.line})" if request.line else ""
        raise QtoolError(f"batch request {request.id!r}{where}: {exc.message}", exc.hint) from exc


def write_batch_outputs(path: str | Path, result: BatchResult, force: bool = False) -> None:
    """The outputs as JSONL, one object per request in input order, written atomically; an existing file is
    replaced only with force."""
    write_jsonl_atomically(path, (output.to_dict() for output in result.outputs), force)
