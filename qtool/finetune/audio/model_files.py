"""A Whisper model directory as transformers writes it: weights + config, the tokenizer, and the feature extractor
whose window matches the encoder. Loading refuses anything else in one line."""

from __future__ import annotations

from pathlib import Path

from qtool.core.errors import QtoolError
from qtool.finetune.audio.features import HOP_LENGTH, N_FFT, SAMPLE_RATE, FeatureShape


def feature_extractor_for(config):
    """transformers' WhisperFeatureExtractor for the model's mel count and window (in whole seconds, the only
    windows that extractor can describe), so pipelines that reload the output compute the same features."""
    from transformers import WhisperFeatureExtractor

    shape = FeatureShape.of_model(config)
    if shape.n_samples % SAMPLE_RATE:
        raise QtoolError(f"the model's input window is {shape.seconds:g} s (max_source_positions {config.max_source_positions})",
                         "use a Whisper config whose max_source_positions is a multiple of 50 (whole seconds)")
    return WhisperFeatureExtractor(feature_size=shape.n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                   chunk_length=shape.n_samples // SAMPLE_RATE, n_fft=N_FFT)


def load_whisper(path: str | Path):
    """(WhisperForConditionalGeneration in float32, its tokenizer) from a local directory."""
    from transformers import AutoConfig, AutoTokenizer, WhisperForConditionalGeneration

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise QtoolError(f"model {path} is not a model directory (no config.json)", "give a directory written by save_pretrained holding a Whisper model")
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != "whisper":
        raise QtoolError(f"model {path} is a {config.model_type!r} model, not a speech recognizer", "give a Whisper-architecture model directory (model_type 'whisper')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise QtoolError(f"model {path} has no tokenizer ({str(exc).splitlines()[0]})", "save the tokenizer beside the model (tokenizer.save_pretrained)") from None
    model = WhisperForConditionalGeneration.from_pretrained(directory, dtype="float32")
    return model, tokenizer


def save_whisper(directory: Path, model, tokenizer, prompt) -> None:
    """Model, tokenizer and feature extractor into `directory`; the generation config says how decoding starts."""
    model.generation_config.decoder_start_token_id = prompt.start_id
    model.generation_config.eos_token_id = prompt.eos_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    feature_extractor_for(model.config).save_pretrained(directory)
