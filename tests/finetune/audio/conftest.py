"""Speech fixtures: a handful of Grimm sentences spoken by espeak-ng (skipped where it is not installed), and a
tiny random Whisper model over a character tokenizer, both built fresh (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from speech_clips import TINY_SIZE, grimm_sentences

from qtool.finetune.audio.char_tokenizer import character_tokenizer
from qtool.finetune.audio.espeak_corpus import espeak_available, write_espeak_corpus
from qtool.finetune.audio.random_whisper import write_random_whisper


@pytest.fixture(scope="session")
def spoken_grimm(tmp_path_factory) -> Path:
    """JSONL of 6 short Grimm sentences spoken in rotating espeak-ng voices (22,050 Hz WAVs)."""
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (Debian: apt-get install espeak-ng); it speaks the test clips")
    return write_espeak_corpus(grimm_sentences(6), tmp_path_factory.mktemp("spoken-grimm"))


@pytest.fixture
def tiny_whisper_dir(tmp_path) -> Path:
    return write_random_whisper(tmp_path / "tiny-whisper", character_tokenizer(), TINY_SIZE, seed=0)
