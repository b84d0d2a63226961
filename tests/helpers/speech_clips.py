"""Speech test helpers: WAV files written from known samples, pure tones, Grimm sentences to speak, and the
size of the tiny random Whisper the audio tests train."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import pytest
import torch

from qtool.finetune.audio.espeak_corpus import pick_sentences
from qtool.finetune.audio.random_whisper import WhisperSize

GRIMM_TRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "grimm" / "train.txt"
# A 3 s window: short sentences fit it at espeak's slowest default voice.
TINY_SIZE = WhisperSize(layers=2, width=64, heads=4, ffn=128, window_seconds=3, max_target_positions=64)


def grimm_sentences(count: int, max_words: int = 5) -> list[str]:
    if not GRIMM_TRAIN.is_file():
        pytest.skip(f"{GRIMM_TRAIN} is missing (shared data: Grimm's tales)")
    return pick_sentences(GRIMM_TRAIN.read_text(), count, min_words=3, max_words=max_words)


def write_wav(path: Path, samples: torch.Tensor, rate: int, width: int = 2) -> Path:
    """PCM WAV of [frames] or [frames, channels] float samples in [-1, 1], `width` bytes a sample."""
    if samples.dim() == 1:
        samples = samples[:, None]
    scale = 2 ** (8 * width - 1)  # the usual convention: full scale is 2^(bits-1), the top code one step below it
    ints = (samples.double() * scale).round().long().clamp(-scale, scale - 1)
    if width == 1:
        data = (ints + 128).to(torch.uint8).numpy().tobytes()
    else:
        data = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.reshape(-1).tolist())
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(samples.shape[1])
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(data)
    return path


def tone(seconds: float, rate: int, freqs=(440.0, 1250.0)) -> torch.Tensor:
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return sum(0.4 * torch.sin(2 * math.pi * f * t) for f in freqs)
