"""Incremental detokenization: a sequence's text grows token by token without re-decoding the whole output, holding
back pieces until their characters are complete, and ends before the first stop string it meets."""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # what decoding gives for a UTF-8 character whose bytes have not all arrived


class IncrementalDetokenizer:
    """Decodes a short window of recent tokens each step: the text of tokens[prefix:read] is already out, and what
    tokens[prefix:] decodes to beyond it is new (decoding a window, not one token, keeps the spaces a tokenizer
    attaches to word starts)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.stopped = False  # a stop string was found: the text is final

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
        return self._append(new)

    def flush(self) -> None:
        """At the end, whatever was held back (an incomplete character included)."""
        if not self.stopped and self.read_offset < len(self.tokens):
            seen = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            self._append(self._decode(self.tokens[self.prefix_offset :])[len(seen) :])
            self.read_offset = len(self.tokens)

    def _append(self, new: str) -> bool:
        # a stop string may straddle the old text and the new piece: search from where it could start
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return True
        return False
