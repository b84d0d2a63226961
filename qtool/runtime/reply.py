"""One reply to a prompt or a conversation for `qtool run`: through the engine when it takes the model, else through
transformers' generate (one log line says why); a ReplyGenerator kept across a chat's turns keeps the prefix cache."""

from __future__ import annotations

import logging
from typing import Any

from qtool.runtime.engine import Engine, EngineConfig, EngineStats, SamplingParams, engine_support
from qtool.runtime.generate import (GenerationResult, GenerationSettings, Message, TextCallback, generate, prompt_ids,
                                    reply_budget)

logger = logging.getLogger(__name__)

# One conversation at a time: the KV cache holds one full context (capped by the engine's byte budget); blocks of
# earlier turns stay cached between replies, so the next turn recomputes only what is new. Decode steps through the
# whole-tensor decode step on the CPU too (EngineConfig's default keeps the module path there): fused q/k/v and
# gate/up and fewer host ops per token, the difference that puts batch-1 chat ahead of transformers' generate on a
# CPU (bench/RESULTS.md, "qtool run against generate on the CPU").
CHAT_ENGINE_CONFIG = EngineConfig(max_num_seqs=1, fast_decode=True)


def sampling_params(settings: GenerationSettings, max_new_tokens: int) -> SamplingParams:
    """The engine's spelling of `settings` (the same stop rule: the engine adds the tokenizer's and the generation
    config's end-of-sequence ids itself)."""
    return SamplingParams(max_tokens=max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                          top_k=settings.top_k, min_p=settings.min_p, repetition_penalty=settings.repetition_penalty,
                          seed=settings.seed, stop=settings.stop)


class ReplyGenerator:
    """Replies from one loaded model. The engine (and its KV cache) is built at the first reply and kept, so a chat's
    next turn reuses the cached blocks of the conversation so far; a model the engine cannot take goes through
    transformers' generate, said once in the log. A draft model (engine_config.speculative="draft") drafts for
    the engine's greedy replies."""

    def __init__(self, model: Any, tokenizer: Any, engine_config: EngineConfig = CHAT_ENGINE_CONFIG,
                 draft_model: Any = None, draft_tokenizer: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine_config = engine_config
        self.draft_model, self.draft_tokenizer = draft_model, draft_tokenizer
        self.fallback_reason = engine_support(model)  # None: the engine runs it
        self.engine: Engine | None = None
        if self.fallback_reason is not None:
            logger.warning("generating with transformers' generate: %s", self.fallback_reason)

    @property
    def backend(self) -> str:
        return "transformers" if self.fallback_reason is not None else "engine"

    def reply(self, conversation: str | list[Message], settings: GenerationSettings = GenerationSettings(),
              on_text: TextCallback | None = None) -> GenerationResult:
        """A reply to `conversation` (raw prompt text, or chat messages {"role", "content"}); `on_text` receives it
        piece by piece as it forms. Same stop rule, context limit and seed rule as generate()."""
        settings.check()
        if self.fallback_reason is not None:
            return generate(self.model, self.tokenizer, conversation, settings, on_text)
        ids = prompt_ids(self.tokenizer, conversation)[0].tolist()
        max_new = reply_budget(self.model, len(ids), settings.max_new_tokens)
        if self.engine is None:
            self.engine = Engine(self.model, self.tokenizer, self.engine_config, self.draft_model, self.draft_tokenizer)
        if len(ids) + max_new > self.engine.capacity_tokens:
            # a conversation longer than the capped KV cache: transformers' cache grows as needed
            logger.warning("generating with transformers' generate: %d prompt + %d new tokens exceed the engine's KV "
                           "cache of %d tokens", len(ids), max_new, self.engine.capacity_tokens)
            return generate(self.model, self.tokenizer, conversation, settings, on_text)
        request = self.engine.add_request(ids, sampling_params(settings, max_new), on_text=on_text)
        output = None
        try:
            while output is None:
                output = next((out for out in self.engine.step() if out.request_id == request), None)
        except BaseException:  # an interrupted reply (Ctrl-C in a chat) must not keep running in the next turn
            self.engine.abort_request(request)
            raise
        return GenerationResult(output.text, len(output.token_ids), output.seconds, output.tokens_per_second,
                                output.token_ids, time_to_first_token=output.time_to_first_token_s,
                                finish_reason=output.finish_reason)

    def stats(self) -> EngineStats | None:
        """The engine's cache and scheduling counts so far (None before the first engine reply or on fallback)."""
        return self.engine.stats() if self.engine is not None else None


def reply(model: Any, tokenizer: Any, conversation: str | list[Message],
          settings: GenerationSettings = GenerationSettings(), on_text: TextCallback | None = None) -> GenerationResult:
    """One reply, through the engine when it takes the model (else transformers' generate, with one log line)."""
    return ReplyGenerator(model, tokenizer).reply(conversation, settings, on_text)
