"""Incremental detokenization: a sequence's text grows token by token without re-decoding the whole output, holding
back pieces until their characters are complete, ends before the first stop string and streams what is safe to show."""

from __future__ import annotations

from typing import Any

from qtool.runtime.stop_strings import StopStringCutter

INCOMPLETE = "\ufffd"  # what decoding gives for a UTF-8 character whose bytes have not all arrived


class IncrementalDetokenizer:
    """Decodes a short window of recent tokens each step: the text of tokens[prefix:read] is already out, and what
    tokens[prefix:] decodes to beyond it is new (decoding a window, not one token, keeps the spaces a tokenizer
    attaches to word starts)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.cutter = StopStringCutter(self.stop)

    @property
    def text(self) -> str:
        return self.cutter.text

    @property
    def stopped(self) -> bool:
        """A stop string was found: the text is final."""
        return self.cutter.stopped

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        """Append a token's text; True when a stop string now appears (the text is cut before it)."""
        self.tokens.append(token)
        if self.stopped:
            return True
        seen = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset :])
        if len(window) <= len(seen) or window.endswith(INCOMPLETE):
            return False
        new = window[len(seen) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self.cutter.add(new)

    def flush(self) -> None:
        """At the end, whatever was held back (an incomplete character included)."""
        if not self.stopped and self.read_offset < len(self.tokens):
            seen = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            self.cutter.add(self._decode(self.tokens[self.prefix_offset :])[len(seen) :])
            self.read_offset = len(self.tokens)

    def stream_piece(self, final: bool = False) -> str:
        """Text not streamed yet that is safe to show: never a stop string or an end that may still become one
        (`final`: after flush, everything left). The pieces concatenate to the final text."""
        return self.cutter.take(final)
