"""Aligning text with what a Whisper decoder expects: it starts from <|startoftranscript|> (the config's
decoder_start_token_id), is told the language and task (multilingual checkpoints only) and <|notimestamps|>, then
reads the transcript and ends on <|endoftext|>. Training feeds that sequence and scores every next token after
the prompt; decoding starts from the prompt."""

from __future__ import annotations

from dataclasses import dataclass

from qtool.core.errors import QtoolError

START = "<|startoftranscript|>"
TRANSCRIBE = "<|transcribe|>"
NO_TIMESTAMPS = "<|notimestamps|>"
# OpenAI's rule: the multilingual vocabularies have 51865 entries or more, the English-only ones 51864.
MULTILINGUAL_VOCAB = 51865
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DecoderPrompt:
    """Token ids of the fixed start of every decoder sequence, and the ends."""

    start_id: int
    task_ids: tuple[int, ...]  # after the start: language, task, no-timestamps (those the model uses)
    eos_id: int

    @property
    def ids(self) -> list[int]:
        return [self.start_id, *self.task_ids]


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)


def decoder_prompt(tokenizer, config, language: str = "en") -> DecoderPrompt:
    """The prompt for `config` (a WhisperConfig) with `tokenizer`; refuses a tokenizer whose special tokens are
    not the ids the model was built with."""
    start_id = _token_id(tokenizer, START)
    if start_id is None or start_id != config.decoder_start_token_id:
        raise QtoolError(f"the tokenizer's {START} is id {start_id}, the model starts decoding at id {config.decoder_start_token_id}",
                         "use the tokenizer saved with the model (its special tokens must be the model's ids)")
    if len(tokenizer) > config.vocab_size:
        raise QtoolError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {config.vocab_size}", "use the tokenizer saved with the model")
    task_ids = []
    if config.vocab_size >= MULTILINGUAL_VOCAB:
        for token in (f"<|{language}|>", TRANSCRIBE):
            token_id = _token_id(tokenizer, token)
            if token_id is None:
                raise QtoolError(f"the multilingual model's tokenizer has no {token} token", "use the tokenizer saved with the model")
            task_ids.append(token_id)
    no_timestamps = _token_id(tokenizer, NO_TIMESTAMPS)
    if no_timestamps is not None:
        task_ids.append(no_timestamps)
    return DecoderPrompt(start_id=start_id, task_ids=tuple(task_ids), eos_id=int(config.eos_token_id))


def transcript_ids(tokenizer, text: str) -> list[int]:
    """The transcript's tokens. Whisper's transcripts start with a space (its byte-level BPE reads ' word' as one
    token, and the checkpoints were trained that way); a character tokenizer just learns the space."""
    return tokenizer(" " + text.strip(), add_special_tokens=False).input_ids


def training_pair(prompt: DecoderPrompt, text_ids: list[int]) -> tuple[list[int], list[int]]:
    """(decoder input ids, labels) of one example: the labels are the inputs shifted by one, ending in <|endoftext|>,
    with the prompt's own tokens ignored (they are given, not predicted)."""
    inputs = prompt.ids + text_ids
    labels = [IGNORE_INDEX] * (len(prompt.task_ids)) + text_ids + [prompt.eos_id]
    return inputs, labels


def transcript_text(tokenizer, ids: list[int], prompt: DecoderPrompt) -> str:
    """Decoded text of generated ids up to (not including) <|endoftext|>, special tokens dropped."""
    if prompt.eos_id in ids:
        ids = ids[: ids.index(prompt.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
