"""Records to token examples for causal-LM training: plain text (loss on every token), prompt/completion (loss on
the completion), chat messages rendered by the tokenizer's chat template (loss on the assistant turns only).
Labels are -100 where no loss is taken; the first label of every example is -100 too, because no token of the
example comes before it (so an example packed after another is never asked to predict across the boundary)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError
from qtool.finetune.records import Records, load_records

IGNORE = -100
LM_KINDS = ("text", "prompt_completion", "chat")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class TokenizedData:
    kind: str
    source: str
    examples: list[Example]
    truncated: int  # examples cut to seqlen (prompt/completion and chat; plain text is split instead)
    dropped: int  # examples left without a token to learn after truncation


def load_examples(source: str | Path, tokenizer: Any, seqlen: int, option: str = "--data") -> TokenizedData:
    """Read, check and tokenize `source` for causal-LM training."""
    return tokenize_records(load_records(source, option), tokenizer, seqlen)


def tokenize_records(records: Records, tokenizer: Any, seqlen: int) -> TokenizedData:
    if records.kind not in LM_KINDS:
        raise QtoolError(f"{records.source}: {records.kind} data (anchor/positive) trains sentence embeddings, not a causal LM",
                         "pass text, prompt/completion or chat messages; for pairs/triplets: qtool finetune embeddings MODEL --data FILE")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise QtoolError("the tokenizer has no end-of-sequence token", "use a model whose tokenizer defines eos_token")
    examples: list[Example] = []
    truncated = dropped = 0
    for number, row in enumerate(records.rows, start=1):
        if records.kind == "text":
            examples.extend(_text_examples(row["text"], tokenizer, eos, seqlen))
            continue
        if records.kind == "prompt_completion":
            example = _prompt_completion(row["prompt"], row["completion"], tokenizer, eos)
        else:
            example = chat_example(row["messages"], tokenizer, f"{records.source}: row {number}")
        if len(example.input_ids) > seqlen:
            truncated += 1
            example = Example(example.input_ids[:seqlen], example.labels[:seqlen])
        if example.label_tokens == 0:
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise QtoolError(f"{records.source}: no example keeps a token to learn within seqlen {seqlen}", "raise --seqlen")
    return TokenizedData(records.kind, records.source, examples, truncated, dropped)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    # verbose=False: a long text is split into seqlen pieces afterwards, on purpose
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _text_examples(text: str, tokenizer: Any, eos: int, seqlen: int) -> list[Example]:
    ids = _ids(tokenizer, text, special=True) + [eos]
    pieces = [ids[start : start + seqlen] for start in range(0, len(ids), seqlen)]
    return [Example(piece, [IGNORE] + piece[1:]) for piece in pieces if len(piece) > 1]


def _prompt_completion(prompt: str, completion: str, tokenizer: Any, eos: int) -> Example:
    prompt_ids = _ids(tokenizer, prompt, special=True)
    completion_ids = _ids(tokenizer, completion, special=False) + [eos]
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    labels[0] = IGNORE
    return Example(prompt_ids + completion_ids, labels)


def chat_example(messages: list[dict[str, str]], tokenizer: Any, where: str) -> Example:
    """The conversation rendered once by the chat template and tokenized once; labels on the characters of each
    assistant turn (from after the template's generation prompt to the end of the turn, its end-of-turn token
    included), found by rendering the conversation up to that turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise QtoolError("chat data needs a tokenizer with a chat template, and this one has none",
                         "use a chat model's tokenizer, or pass prompt/completion data")
    if not getattr(tokenizer, "is_fast", False):
        raise QtoolError("chat data needs a fast tokenizer (character offsets of the tokens)", "use the model's tokenizer.json")
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not full.startswith(through) or not through.startswith(before):
            raise QtoolError(f"{where}: the chat template renders a conversation differently from its beginning",
                             "the loss on assistant turns needs a template whose renders of a conversation's first turns are prefixes of the whole")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    labels = [token if any(start <= begin < end for start, end in spans) else IGNORE
              for token, (begin, _) in zip(ids, encoded["offset_mapping"])]
    if labels:
        labels[0] = IGNORE
    return Example(ids, labels)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
