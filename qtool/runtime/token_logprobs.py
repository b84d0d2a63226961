"""A generated token's log-probability and its most likely alternatives, as the engine reports them, and a token's
text and exact bytes as an API shows them. Torch-free: the serve protocol and the batch file check the limit here.

Which distribution: the model's own, the log-softmax of its logits at that position before the repetition penalty,
temperature and the top-k / top-p / min-p filters. That is what OpenAI reports (and vLLM by default): a request's
logprobs do not depend on its sampling settings, a greedy request has them too, and a token the filters would have
dropped still has a finite value. Every generated token has one, the stop token included, so a request has as many
as its output's token_ids (usage.completion_tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtool.core.json_values import is_int

MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit for chat's top_logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log, float32 precision
    top: tuple[tuple[int, float], ...] = ()  # the k most likely (token id, logprob) at that position, most likely first

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "logprob": self.logprob,
                "top_logprobs": [{"token_id": token, "logprob": logprob} for token, logprob in self.top]}


def valid_top_logprobs(value: Any) -> bool:
    """An alternatives count a request may ask for: an int in 0..MAX_TOP_LOGPROBS."""
    return is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character byte-level BPE vocabularies spell it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


CHAR_TO_BYTE = {char: byte for byte, char in _byte_to_char().items()}


class TokenTexts:
    """Token ids as text (the tokenizer's decode of the one id, special tokens spelled out) and as their exact UTF-8
    bytes: a byte-level BPE vocabulary (GPT-2, Llama 3, SmolLM2, Qwen) maps back to the token's own bytes, so a
    token holding part of a character gives those bytes, not the replacement character's; other vocabularies give
    the bytes of the decoded text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        # added tokens (specials) are plain text, not the byte alphabet: their bytes are their text's UTF-8
        self._added = set(getattr(tokenizer, "added_tokens_decoder", None) or ())
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._texts[token_id]

    def bytes(self, token_id: int) -> list[int]:
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if token_id not in self._added and isinstance(piece, str) and piece and all(c in CHAR_TO_BYTE for c in piece):
                return [CHAR_TO_BYTE[char] for char in piece]
        return list(self.text(token_id).encode("utf-8"))
