"""An offline speech corpus: sentences picked from a text, spoken by espeak-ng (a formant synthesizer, so real
waveforms with real timing, though far from human voices) in several voices, speeds and pitches, written as WAV
files and a speech JSONL file (`audio`, `text`) that `read_speech_jsonl` reads."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qtool.core.errors import QtoolError

ESPEAK = "espeak-ng"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PLAIN = re.compile(r"^[A-Z][A-Za-z ,;:'-]*[a-z][.!?]$")  # words a listener can write down; no digits or quotes
_SHOUTED = re.compile(r"\b[A-Z]{2,}\b")  # headings and abbreviations in capitals read letter by letter


@dataclass(frozen=True)
class Voice:
    name: str  # an espeak-ng voice, e.g. en-us, optionally with a variant: en-gb+f3
    speed: int  # words per minute
    pitch: int  # 0-99


DEFAULT_VOICES = tuple(Voice(name, speed, pitch) for name, speed, pitch in
                       (("en-us", 165, 50), ("en-gb", 150, 40), ("en-us+f3", 180, 60), ("en-gb-scotland", 140, 45)))


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def pick_sentences(text: str, count: int, min_words: int = 3, max_words: int = 10) -> list[str]:
    """The first `count` distinct sentences of `text` with between min_words and max_words words, made only of
    letters and plain punctuation (quotes and digits have no single spoken form)."""
    picked: dict[str, None] = {}
    for paragraph in text.split("\n\n"):
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            if _PLAIN.match(sentence) and not _SHOUTED.search(sentence) and min_words <= len(sentence.split()) <= max_words:
                picked.setdefault(sentence)
                if len(picked) == count:
                    return list(picked)
    return list(picked)


def speak(text: str, path: Path, voice: Voice) -> None:
    """One WAV file (espeak-ng writes 22,050 Hz 16-bit mono) of `text` in `voice`."""
    if not espeak_available():
        raise QtoolError(f"{ESPEAK} is not installed", "install it (Debian: apt-get install espeak-ng) to synthesize speech")
    result = subprocess.run([ESPEAK, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", str(path), "--", text],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not path.is_file():
        raise QtoolError(f"{ESPEAK} failed for voice {voice.name}: {result.stderr.strip() or result.returncode}", f"check `{ESPEAK} --voices=en` lists the voice")


def write_espeak_corpus(sentences: list[str], directory: str | Path, voices: tuple[Voice, ...] = DEFAULT_VOICES, name: str = "speech") -> Path:
    """Speak each sentence in the next voice of `voices` (round robin) into `directory`/`name`-NNNN.wav and write
    `directory`/`name`.jsonl with paths relative to it; returns the JSONL path."""
    if not sentences:
        raise QtoolError("no sentences to speak", "give a text with sentences of the requested length")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (sentence, voice) in enumerate(zip(sentences, itertools.cycle(voices))):
        wav = directory / f"{name}-{index:04d}.wav"
        speak(sentence, wav, voice)
        rows.append({"audio": wav.name, "text": sentence, "voice": voice.name, "speed": voice.speed})
    jsonl = directory / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return jsonl
