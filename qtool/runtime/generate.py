"""Text generation through transformers' generate: a prompt or a chat (through the tokenizer's chat template),
greedy or sampled, streamed to a callback as the text forms; the fallback of `runtime/reply.py` and `runtime/batch.py`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer

from qtool.core.errors import QtoolError
from qtool.models.finite_outputs import model_name, non_finite_logits_error
from qtool.runtime.stop_strings import StopStringCutter, first_stop

Message = dict[str, str]
TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.9
    top_k: int = 0  # 0 switches top-k filtering off
    seed: int | None = None  # None: drawn from torch's global random state; a seed leaves that state alone
    min_p: float = 0.0  # 0 switches min-p filtering off
    repetition_penalty: float = 1.0  # 1 switches it off
    stop: tuple[str, ...] = ()  # stop strings: the reply ends before the first one

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise QtoolError(f"--max-new-tokens {self.max_new_tokens} must be at least 1", "e.g. --max-new-tokens 256")
        # nan passes `< 0` (it compares false with everything) and would reach sampling as nan probabilities
        if not math.isfinite(self.temperature):
            raise QtoolError(f"--temperature {self.temperature} must be a finite number", "0 is greedy; 0.2 to 1.0 samples")
        if self.temperature < 0:
            raise QtoolError(f"--temperature {self.temperature} must not be negative", "0 is greedy; 0.2 to 1.0 samples")
        if not 0 < self.top_p <= 1:  # false for nan too
            raise QtoolError(f"--top-p {self.top_p} must be in (0, 1]", "1 switches nucleus sampling off")
        if self.top_k < 0:
            raise QtoolError(f"--top-k {self.top_k} must not be negative", "0 switches top-k off")
        if not 0 <= self.min_p < 1:
            raise QtoolError(f"--min-p {self.min_p} must be in [0, 1)", "0 switches min-p off")
        if self.repetition_penalty <= 0:
            raise QtoolError(f"--repetition-penalty {self.repetition_penalty} must be above 0", "1 switches it off")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise QtoolError(f"--stop {list(self.stop)!r} must be non-empty strings", "e.g. --stop '###'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    text: str
    tokens: int  # new tokens generated, the stop token included when one ended the reply
    seconds: float
    tokens_per_second: float
    token_ids: list[int]
    time_to_first_token: float = 0.0  # seconds from the start of the call to the first new token
    finish_reason: str = "length"  # "stop" (a stop token or string) or "length" (max_new_tokens or the context)

    def to_dict(self) -> dict[str, Any]:
        """What `qtool run --json` prints (no ids)."""
        return {"text": self.text, "tokens": self.tokens, "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "time_to_first_token": self.time_to_first_token, "finish_reason": self.finish_reason}


class CallbackStreamer(TextStreamer):
    """transformers' TextStreamer (it holds text back until words and UTF-8 characters are complete), handing
    each finished piece to a callback instead of printing it, never a stop string nor an end that may still become
    one; it also notes when the first new token came."""

    def __init__(self, tokenizer: Any, on_text: TextCallback | None, stop: tuple[str, ...] = ()):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.cutter = StopStringCutter(stop)
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.first_token_time is None:  # the first put is the prompt
            self.first_token_time = time.perf_counter()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.cutter.add(text)
        piece = self.cutter.take(final=stream_end)
        if piece and self.on_text is not None:
            self.on_text(piece)


class StopStringCriteria(StoppingCriteria):
    """Ends generation (batch of one) once the decoded reply contains a stop string: the token where the engine's
    incremental text meets it too."""

    def __init__(self, tokenizer: Any, prompt_length: int, stop: tuple[str, ...]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), first_stop(text, self.stop) is not None, dtype=torch.bool, device=input_ids.device)


class FiniteLogitsCheck(LogitsProcessor):
    """Stops generation at the first step whose logits hold a NaN or +inf: greedy decoding would pick an arbitrary
    token and sampling would fail inside torch. It runs before temperature and top-k/top-p, whose -inf for
    filtered tokens is legitimate."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool((torch.isnan(scores) | torch.isposinf(scores)).any()):
            raise non_finite_logits_error(self.name)
        return scores


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, conversation: str | list[Message]) -> torch.Tensor:
    """[1, n] input ids: a str is used as it is (the tokenizer's own BOS rule applies); a message list goes
    through the chat template, ending with the assistant's turn."""
    if isinstance(conversation, str):
        return tokenizer(conversation, return_tensors="pt")["input_ids"]
    if not has_chat_template(tokenizer):
        raise QtoolError("the tokenizer has no chat template, so a conversation cannot be formatted", "use --raw to send the prompt text as it is")
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # The template already wrote every special token the model expects.
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config, without duplicates."""
    found: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in found:
                found.append(int(token))
    return found


def reply_budget(model: Any, prompt_length: int, max_new_tokens: int) -> int:
    """The most new tokens a reply to a prompt of prompt_length tokens may have: max_new_tokens, cut where the
    model's positions end; a prompt that fills the context is refused."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and prompt_length >= context:
        raise QtoolError(f"the prompt is {prompt_length} tokens, the model's context is {context}", "shorten the prompt (or the conversation)")
    return min(max_new_tokens, context - prompt_length) if context else max_new_tokens


def generation_config(model: Any, tokenizer: Any, settings: GenerationSettings, max_new_tokens: int) -> GenerationConfig:
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    if settings.greedy:
        sampling = dict(do_sample=False)
    else:
        # top_k=0 must be passed as 0: None would fall back to transformers' default of 50.
        sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                        min_p=settings.min_p or None)
    penalty = dict(repetition_penalty=settings.repetition_penalty) if settings.repetition_penalty != 1.0 else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad, **sampling, **penalty)


def generate(
    model: Any,
    tokenizer: Any,
    conversation: str | list[Message],
    settings: GenerationSettings = GenerationSettings(),
    on_text: TextCallback | None = None,
    name: str | None = None,
) -> GenerationResult:
    """Generate a reply to `conversation` (raw prompt text, or chat messages {"role", "content"}); `on_text`
    receives the reply piece by piece as it is generated. NaN logits raise an error naming `name` (default: where
    the model was loaded from)."""
    settings.check()
    device = next(model.parameters()).device
    input_ids = prompt_ids(tokenizer, conversation).to(device)
    # Never run past the context: the reply is cut where the model's positions end.
    max_new = reply_budget(model, input_ids.shape[1], settings.max_new_tokens)
    config = generation_config(model, tokenizer, settings, max_new)
    # the streamer also times the first token, so it runs even when nobody reads the text
    streamer = CallbackStreamer(tokenizer, on_text, settings.stop)
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, input_ids.shape[1], settings.stop)] if settings.stop else [])
    # A seed must not leak into the caller's random state: fork it for the duration of the call.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, enabled=settings.seed is not None), torch.inference_mode():
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        start = time.perf_counter()
        checks = LogitsProcessorList([FiniteLogitsCheck(name or model_name(model))])
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, streamer=streamer,
                                stopping_criteria=criteria, logits_processor=checks)
        seconds = time.perf_counter() - start
    new_ids = output[0, input_ids.shape[1] :].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cut = first_stop(text, settings.stop)
    text = text if cut is None else text[:cut]
    stopped = cut is not None or (bool(new_ids) and new_ids[-1] in (config.eos_token_id or []))
    first = streamer.first_token_time - start if streamer.first_token_time is not None else seconds
    tokens = len(new_ids)
    return GenerationResult(text, tokens, seconds, tokens / seconds if seconds > 0 else float("inf"), new_ids,
                            time_to_first_token=first, finish_reason="stop" if stopped else "length")
