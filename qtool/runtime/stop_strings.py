"""Stop strings over text that grows piece by piece: where the first one starts, and how much of the text's end must
be held back from a stream because it may still grow into one."""

from __future__ import annotations


def first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the earliest stop string found at or after `start` begins, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def search_start(text_before: str, stops: tuple[str, ...]) -> int:
    """Where to search after appending to `text_before`: a stop string may straddle the old text and the new piece."""
    return max(0, len(text_before) - max((len(s) for s in stops), default=0) + 1)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (so not yet safe to show)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopStringCutter:
    """Text arriving in pieces, cut before the first stop string; `take()` hands out what is safe to stream: all of
    it once the text is final, otherwise all but an end that could still become a stop string."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(stops)
        self.text = ""
        self.stopped = False  # a stop string was found: the text is final
        self.taken = 0  # characters of text already handed out

    def add(self, piece: str) -> bool:
        """Append a piece; True when a stop string now appears (the text is cut before it and stays final)."""
        if self.stopped:
            return True
        start = search_start(self.text, self.stops)
        self.text += piece
        cut = first_stop(self.text, self.stops, start)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that is safe to show (`final`: the text will not grow any more)."""
        end = len(self.text) if final or self.stopped else len(self.text) - held_back(self.text, self.stops)
        # a cut never reaches into text handed out: that text's end was held back while it could begin a stop string
        piece = self.text[self.taken : end]
        self.taken = max(self.taken, end)
        return piece
