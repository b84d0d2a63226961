"""Training end to end on espeak-ng speech: a tiny random Whisper overfits six spoken Grimm sentences (loss and
greedy-transcript WER fall), the saved directory reloads in transformers with the same transcripts and features,
greedy decoding over the KV cache equals decoding by full recomputation, and bad inputs stop before training."""

from __future__ import annotations

import json

import pytest
import torch
from speech_clips import TINY_SIZE, tone, write_wav
from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

from qtool.core.errors import QtoolError
from qtool.finetune.audio.asr_trainer import train_asr
from qtool.finetune.audio.char_tokenizer import character_tokenizer
from qtool.finetune.audio.decoding import greedy_transcribe
from qtool.finetune.audio.features import FeatureShape, log_mel_spectrogram, pad_or_trim
from qtool.finetune.audio.random_whisper import random_whisper
from qtool.finetune.audio.speech_data import load_audio, read_speech_jsonl
from qtool.finetune.audio.transcripts import decoder_prompt, transcript_text


def test_tiny_whisper_overfits_spoken_sentences_and_reloads(spoken_grimm, tiny_whisper_dir, tmp_path):
    output = tmp_path / "tuned"
    report = train_asr(tiny_whisper_dir, spoken_grimm, output, max_steps=100, lr=5e-3, batch_size=6, seed=0, device="cpu")
    assert report.loss_after < 0.25 * report.loss_before, report
    assert report.wer_after < report.wer_before and report.wer_after <= 0.2, report
    assert report.train_loss_last < report.train_loss_first

    model = WhisperForConditionalGeneration.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    extractor = WhisperFeatureExtractor.from_pretrained(output)
    examples = read_speech_jsonl(spoken_grimm)[:3]
    waves = [load_audio(e.audio) for e in examples]
    shape = FeatureShape.of_model(model.config)
    features = log_mel_spectrogram(pad_or_trim(waves, shape.n_samples), shape.n_mels)
    theirs = extractor([w.numpy() for w in waves], sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(features, theirs, atol=1e-4, rtol=0)  # the saved extractor makes the trained-on features
    prompt = decoder_prompt(tokenizer, model.config)
    transcripts = [transcript_text(tokenizer, ids, prompt) for ids in greedy_transcribe(model, features, prompt, 60)]
    assert transcripts == [sample["after"] for sample in report.samples]


def test_cached_greedy_decoding_equals_full_recomputation():
    tokenizer = character_tokenizer()
    model = random_whisper(tokenizer, TINY_SIZE, seed=int(torch.randint(0, 1000, (1,))))
    prompt = decoder_prompt(tokenizer, model.config)
    features = torch.randn(3, TINY_SIZE.n_mels, 2 * model.config.max_source_positions)
    cached = greedy_transcribe(model, features, prompt, max_new_tokens=9)
    sequences = torch.tensor([prompt.ids] * 3)
    with torch.no_grad():
        for _ in range(len(cached[0])):
            logits = model(input_features=features, decoder_input_ids=sequences).logits
            sequences = torch.cat([sequences, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for row, ids in enumerate(cached):
        full = sequences[row, len(prompt.ids):].tolist()
        stop = full.index(prompt.eos_id) + 1 if prompt.eos_id in full else len(full)
        assert ids[:stop] == full[:stop]


def test_a_clip_longer_than_the_window_is_refused(tiny_whisper_dir, tmp_path):
    write_wav(tmp_path / "long.wav", tone(TINY_SIZE.window_seconds + 0.5, 22050), 22050)
    (tmp_path / "data.jsonl").write_text(json.dumps({"audio": "long.wav", "text": "far too long"}) + "\n")
    with pytest.raises(QtoolError, match="long.wav lasts 3.50 s, longer than the model's 3 s window"):
        train_asr(tiny_whisper_dir, tmp_path / "data.jsonl", tmp_path / "out", max_steps=1)
    assert not (tmp_path / "out").exists()


def test_existing_output_and_non_whisper_models_are_refused_before_training(tiny_whisper_dir, tmp_path):
    write_wav(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    (tmp_path / "data.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "a tone"}) + "\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(QtoolError, match="already exists"):
        train_asr(tiny_whisper_dir, tmp_path / "data.jsonl", tmp_path / "taken", max_steps=1)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QtoolError, match="'llama' model, not a speech recognizer"):
        train_asr(tmp_path / "llama", tmp_path / "data.jsonl", tmp_path / "out", max_steps=1)
    with pytest.raises(QtoolError, match="--lr 0.0"):
        train_asr(tiny_whisper_dir, tmp_path / "data.jsonl", tmp_path / "out", max_steps=1, lr=0.0)


def test_a_frozen_encoder_stays_as_it_was_while_the_decoder_learns(tiny_whisper_dir, tmp_path):
    write_wav(tmp_path / "a.wav", tone(0.8, 22050), 22050)
    (tmp_path / "data.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "a tone"}) + "\n")
    report = train_asr(tiny_whisper_dir, tmp_path / "data.jsonl", tmp_path / "out", max_steps=8, lr=3e-3, batch_size=1, freeze_encoder=True, device="cpu")
    assert report.trained == "decoder (encoder frozen)" and report.loss_after < report.loss_before
    before = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).state_dict()
    after = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    encoder = [name for name in before if name.startswith("model.encoder.")]
    assert encoder and all(torch.equal(before[name], after[name]) for name in encoder)
    assert not torch.equal(before["model.decoder.layers.0.fc1.weight"], after["model.decoder.layers.0.fc1.weight"])
