"""Speech data: WAV samples read back exactly at every PCM width, channels mixed, any rate brought to 16 kHz,
JSONL rows resolved and refused in one line, and transcripts aligned with the decoder's prompt."""

from __future__ import annotations

import json

import pytest
import torch
from speech_clips import tone, write_wav
from transformers import WhisperConfig

from qtool.core.errors import QtoolError
from qtool.finetune.audio.char_tokenizer import character_tokenizer
from qtool.finetune.audio.features import SAMPLE_RATE
from qtool.finetune.audio.speech_data import load_audio, read_speech_jsonl, read_wav
from qtool.finetune.audio.transcripts import IGNORE_INDEX, decoder_prompt, training_pair, transcript_ids, transcript_text


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_samples_read_back_at_every_width(tmp_path, width):
    samples = torch.rand(1001, dtype=torch.float64) * 1.8 - 0.9
    read, rate = read_wav(write_wav(tmp_path / "a.wav", samples, 11025, width))
    assert rate == 11025 and read.dtype == torch.float32
    half_step = 0.5 / 2 ** (8 * width - 1)  # rounding to the nearest code
    torch.testing.assert_close(read.double(), samples, atol=half_step * 1.001 + 1e-7, rtol=0)


def test_stereo_is_averaged(tmp_path):
    left, right = torch.rand(777, dtype=torch.float64) - 0.5, torch.rand(777, dtype=torch.float64) - 0.5
    read, _ = read_wav(write_wav(tmp_path / "s.wav", torch.stack([left, right], dim=1), 16000))
    torch.testing.assert_close(read.double(), (left + right) / 2, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rate", [8000, 22050, 16000])
def test_any_rate_loads_at_16k(tmp_path, rate):
    audio = load_audio(write_wav(tmp_path / "t.wav", tone(0.77, rate), rate))
    assert len(audio) == -(-round(0.77 * rate) * SAMPLE_RATE // rate)
    expected = tone(len(audio) / SAMPLE_RATE, SAMPLE_RATE)
    torch.testing.assert_close(audio[200:-200].double(), expected[200:-200], atol=3e-3, rtol=0)


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_rows_resolve_paths_relative_to_the_file(tmp_path):
    (tmp_path / "clips").mkdir()
    write_wav(tmp_path / "clips" / "a.wav", tone(0.2, 16000), 16000)
    data = write_rows(tmp_path / "data.jsonl", [{"audio": "clips/a.wav", "text": "  The king.  "}, "",
                                                {"audio": str(tmp_path / "clips" / "a.wav"), "text": "Wolf"}])
    examples = read_speech_jsonl(data)
    assert [e.text for e in examples] == ["The king.", "Wolf"]
    assert all(e.audio == tmp_path / "clips" / "a.wav" for e in examples)


@pytest.mark.parametrize("row, words", [
    ({"audio": "missing.wav", "text": "hello"}, ["line 1", "missing.wav", "does not exist"]),
    ({"audio": "a.wav", "text": "   "}, ["line 1", "empty 'text'"]),
    ({"audio": "a.wav"}, ["line 1", "'audio' and 'text'"]),
    ("{not json", ["line 1", "not JSON"]),
])
def test_bad_rows_are_refused_in_one_line(tmp_path, row, words):
    write_wav(tmp_path / "a.wav", tone(0.1, 16000), 16000)
    with pytest.raises(QtoolError) as error:
        read_speech_jsonl(write_rows(tmp_path / "data.jsonl", [row]))
    message = error.value.one_line()
    assert "\n" not in message and "data.jsonl" in message and all(word in message for word in words), message


def test_missing_file_and_non_wav_audio_are_refused(tmp_path):
    with pytest.raises(QtoolError, match="no such file"):
        read_speech_jsonl(tmp_path / "absent.jsonl", "--eval-data")
    (tmp_path / "fake.wav").write_text("not audio")
    with pytest.raises(QtoolError, match="fake.wav is not a PCM WAV file"):
        load_audio(tmp_path / "fake.wav")


def test_labels_are_the_decoder_inputs_shifted_with_the_prompt_ignored():
    tokenizer = character_tokenizer()
    config = WhisperConfig(vocab_size=len(tokenizer), decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"), eos_token_id=tokenizer.eos_token_id)
    prompt = decoder_prompt(tokenizer, config)
    assert prompt.ids == tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    text = transcript_ids(tokenizer, "Open to me!")
    inputs, labels = training_pair(prompt, text)
    assert len(inputs) == len(labels)
    assert labels[: len(prompt.task_ids)] == [IGNORE_INDEX] * len(prompt.task_ids)
    assert labels[len(prompt.task_ids):] == inputs[len(prompt.ids):] + [prompt.eos_id]  # each label is the next input
    assert transcript_text(tokenizer, text + [prompt.eos_id, 5, 6], prompt) == "Open to me!"


def test_multilingual_models_get_language_and_task_tokens():
    tokenizer = character_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|notimestamps|>", "<|en|>", "<|de|>", "<|transcribe|>"]})
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    multilingual = WhisperConfig(vocab_size=51865, decoder_start_token_id=start, eos_token_id=tokenizer.eos_token_id)
    prompt = decoder_prompt(tokenizer, multilingual, language="de")
    assert prompt.task_ids == tuple(tokenizer.convert_tokens_to_ids(["<|de|>", "<|transcribe|>", "<|notimestamps|>"]))
    with pytest.raises(QtoolError, match="no <\\|fr\\|> token"):
        decoder_prompt(tokenizer, multilingual, language="fr")
    with pytest.raises(QtoolError, match="starts decoding at id 3"):
        decoder_prompt(tokenizer, WhisperConfig(vocab_size=51865, decoder_start_token_id=3))
