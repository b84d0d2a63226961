"""A character-level tokenizer with Whisper's special tokens, for a Whisper model initialised from scratch when no
Whisper vocabulary is at hand (the vocab files cannot be downloaded here). Saved and reloaded by transformers like
any fast tokenizer (tokenizer.json)."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from qtool.finetune.audio.transcripts import NO_TIMESTAMPS, START

UNKNOWN = "<|unk|>"
END = "<|endoftext|>"
# Printable ASCII: the letters, digits, punctuation and the space; anything else reads as <|unk|>.
CHARACTERS = string.printable[:95]


def character_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """One token per character, then <|unk|>, <|endoftext|> (also padding), <|startoftranscript|>, <|notimestamps|>."""
    vocab = {char: index for index, char in enumerate(dict.fromkeys(characters))}
    for token in (UNKNOWN, END, START, NO_TIMESTAMPS):
        vocab[token] = len(vocab)
    # BPE without merges splits text into its characters; Fuse joins decoded characters without separators.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNKNOWN))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNKNOWN, eos_token=END, pad_token=END,
                                   bos_token=START, additional_special_tokens=[NO_TIMESTAMPS])
