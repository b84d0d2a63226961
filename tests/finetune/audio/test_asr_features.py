"""Log-mel features and resampling against references: transformers' WhisperFeatureExtractor and mel filter bank
on the same fresh random waves (odd lengths, the full 30 s window and a small model's 3 s one), and analytic sines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from speech_clips import tone
from qtool.finetune.audio.features import SAMPLE_RATE, FeatureShape, log_mel_spectrogram, mel_filters, pad_or_trim, resample


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers_slaney_bank(n_mels):
    reference = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                                sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    torch.testing.assert_close(mel_filters(n_mels), torch.from_numpy(reference), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_seconds, n_mels", [(30, 80), (3, 128)])
def test_log_mel_equals_whisper_feature_extractor(chunk_seconds, n_mels):
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_seconds)
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = [int(torch.randint(1000, chunk_seconds * SAMPLE_RATE, (1,), generator=generator)) | 1 for _ in range(3)]
    waves = [torch.randn(n, generator=generator, dtype=torch.float64) * scale for n, scale in zip(lengths, (0.05, 0.3, 1.0))]
    reference = extractor([w.numpy() for w in waves], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    ours = log_mel_spectrogram(pad_or_trim(waves, extractor.n_samples).double(), n_mels)
    assert ours.shape == reference.shape == (3, n_mels, chunk_seconds * 100)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4, rtol=0)


def test_feature_shape_follows_the_encoder():
    config = WhisperConfig(num_mel_bins=80, max_source_positions=150)
    assert FeatureShape.of_model(config) == FeatureShape(n_mels=80, n_frames=300)
    assert FeatureShape.of_model(config).n_samples == 3 * SAMPLE_RATE


@pytest.mark.parametrize("from_rate, seconds", [(22050, 1.37), (44100, 0.51), (8000, 1.01), (16000, 0.3)])
def test_resample_matches_the_same_tones_sampled_at_16k(from_rate, seconds):
    source = tone(seconds, from_rate)
    out = resample(source, from_rate)
    expected = tone(len(out) / SAMPLE_RATE, SAMPLE_RATE)
    assert len(out) == -(-len(source) * SAMPLE_RATE // from_rate)
    edge = 200  # the sinc filter sees zeros past the ends; compare the interior
    torch.testing.assert_close(out[edge:-edge], expected[edge:-edge], atol=2e-3, rtol=0)


def test_resample_removes_what_16k_cannot_hold():
    above_nyquist = tone(1.0, 44100, freqs=(11000.0,))
    assert resample(above_nyquist, 44100)[200:-200].abs().max() < 0.02
