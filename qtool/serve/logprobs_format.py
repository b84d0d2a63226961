"""The engine's TokenLogprobs in OpenAI's two shapes: chat's {"content": [{token, logprob, bytes, top_logprobs}]}
and completions' {tokens, token_logprobs, top_logprobs, text_offset}. A token's text is the tokenizer's decode of
that one id (special tokens spelled out, a part of a character shown as U+FFFD) and its bytes are exact
(runtime/token_logprobs.TokenTexts). Every generated token is listed, the stop token included, so the tokens'
texts can run past the choice's text (a stop string, the end-of-turn token)."""

from __future__ import annotations

from typing import Any

from qtool.runtime.token_logprobs import TokenLogprob, TokenTexts


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    def token(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": texts.text(token_id), "logprob": logprob, "bytes": texts.bytes(token_id)}

    return {"content": [{**token(entry.token_id, entry.logprob),
                         "top_logprobs": [token(token_id, logprob) for token_id, logprob in entry.top]}
                        for entry in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int = 0) -> dict[str, Any]:
    """`offset`: where the first entry's text starts in the choice (a stream's later chunk). Each top_logprobs
    dict holds the k alternatives and the chosen token (OpenAI's "up to logprobs + 1"), keyed by text: of ids
    that decode alike, the most likely is kept."""
    tokens, offsets, tops = [], [], []
    for entry in entries:
        text = texts.text(entry.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top: dict[str, float] = {}
        for token_id, logprob in entry.top:
            top.setdefault(texts.text(token_id), logprob)
        top.setdefault(text, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries], "top_logprobs": tops,
            "text_offset": offsets}


def text_length(entries: list[TokenLogprob], texts: TokenTexts) -> int:
    """How far the entries' texts reach: the next stream chunk's text_offset starts there."""
    return sum(len(texts.text(entry.token_id)) for entry in entries)
