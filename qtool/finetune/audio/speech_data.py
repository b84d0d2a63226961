"""Speech data: a JSONL file of {"audio": path, "text": transcript} rows (paths relative to the file), WAV audio
read with the standard library, mixed to mono and resampled to 16 kHz. Every refusal names the file and the row."""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.core.errors import QtoolError
from qtool.finetune.audio.features import SAMPLE_RATE, resample

ROW_HINT = 'each line must be a JSON object like {"audio": "clip.wav", "text": "what is said"}'
_PCM_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # 3-byte samples are widened by hand


@dataclass(frozen=True)
class SpeechExample:
    audio: Path
    text: str


def read_speech_jsonl(path: str | Path, option: str = "--data") -> list[SpeechExample]:
    """The rows of a speech JSONL file, each with an existing audio file and a non-empty transcript."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"{option} {path}: no such file", ROW_HINT.replace("each line", "give a JSONL file; each line"))
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{option} {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QtoolError(f"{where} is not JSON ({exc.msg})", ROW_HINT) from None
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
            raise QtoolError(f"{where} has no string 'audio' and 'text' fields", ROW_HINT)
        if not row["text"].strip():
            raise QtoolError(f"{where} has an empty 'text'", "every clip needs its transcript; drop the row or fill it in")
        audio = Path(row["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        if not audio.is_file():
            raise QtoolError(f"{where}: audio file {audio} does not exist", "audio paths are absolute or relative to the JSONL file's folder")
        examples.append(SpeechExample(audio=audio, text=row["text"].strip()))
    if not examples:
        raise QtoolError(f"{option} {path} has no rows", ROW_HINT)
    return examples


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """(float32 mono samples in [-1, 1], sample rate) of a PCM WAV file; channels are averaged."""
    try:
        with wave.open(str(path), "rb") as reader:
            channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
            raw = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as exc:
        raise QtoolError(f"audio file {path} is not a PCM WAV file ({exc})", "convert it to 16-bit PCM WAV, e.g. `sox in.mp3 -b 16 out.wav`") from None
    if width not in (1, 2, 3, 4):
        raise QtoolError(f"audio file {path} has {8 * width}-bit samples", "use 8, 16, 24 or 32-bit PCM WAV")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if width == 3:  # little-endian 24-bit: put each sample in the top 3 bytes of an int32
        data = torch.cat([torch.zeros(data.numel() // 3, 1, dtype=torch.uint8), data.view(-1, 3)], dim=1).reshape(-1)
        width = 4
    samples = data.view(_PCM_DTYPES[width]).to(torch.float32)
    samples = (samples - 128.0) / 128.0 if width == 1 else samples / float(2 ** (8 * width - 1))
    return samples.view(-1, channels).mean(dim=1), rate


def load_audio(path: Path) -> torch.Tensor:
    """A WAV file as 16 kHz mono float32 samples, resampled from whatever rate it was recorded at."""
    samples, rate = read_wav(path)
    if samples.numel() == 0:
        raise QtoolError(f"audio file {path} has no samples", "give a clip with speech in it")
    return resample(samples, rate, SAMPLE_RATE)
