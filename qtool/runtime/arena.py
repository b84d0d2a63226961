"""The arena: one prompt to two or more models (or variants of one: float, GPTQ, EXL2), each reply with its time to
first token, tokens/s and token count. `qtool run --arena` replies one model after the other, so each speed is
measured with the device to itself; the studio page streams them side by side through the server instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qtool.core.errors import QtoolError
from qtool.runtime.generate import GenerationSettings, Message
from qtool.runtime.reply import ReplyGenerator

ArenaTextCallback = Callable[[str, str], None]  # (contender name, piece of its reply)


@dataclass(frozen=True)
class Contender:
    name: str  # how the table labels it: the model as given on the command line
    replies: ReplyGenerator
    conversation: str | list[Message]  # its own: the chat template (or raw text) differs between models


@dataclass
class ArenaReply:
    name: str
    text: str
    tokens: int
    seconds: float
    time_to_first_token: float
    tokens_per_second: float
    finish_reason: str
    backend: str  # "engine" or "transformers"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_arena(contenders: list[Contender], settings: GenerationSettings,
              on_text: ArenaTextCallback | None = None) -> list[ArenaReply]:
    """Each contender's reply, in order, through its own ReplyGenerator (the same sampling settings and seed for
    all); `on_text(name, piece)` receives each reply as it forms."""
    if len(contenders) < 2:
        raise QtoolError(f"the arena needs at least two models, got {len(contenders)}", "e.g. --arena MODEL_A MODEL_B")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise QtoolError(f"the arena's models must differ, got {' '.join(names)}", "name each model once")
    settings.check()
    results = []
    for contender in contenders:
        stream = None if on_text is None else (lambda piece, name=contender.name: on_text(name, piece))
        result = contender.replies.reply(contender.conversation, settings, on_text=stream)
        results.append(ArenaReply(contender.name, result.text, result.tokens, result.seconds,
                                  result.time_to_first_token, result.tokens_per_second, result.finish_reason,
                                  contender.replies.backend))
    return results
