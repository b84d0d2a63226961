"""A randomly initialised Whisper-architecture model sized by data (layers, widths, a window of whole seconds),
written as a directory transformers loads: weights, config, tokenizer and feature extractor. For tests and for
benchmarks where no pretrained Whisper checkpoint can be had."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from qtool.finetune.audio.features import FeatureShape
from qtool.finetune.audio.model_files import feature_extractor_for
from qtool.finetune.audio.transcripts import START


@dataclass(frozen=True)
class WhisperSize:
    layers: int = 2
    width: int = 64
    heads: int = 4
    ffn: int = 256
    n_mels: int = 80
    window_seconds: int = 4  # the encoder's fixed input length; clips are zero-padded to it
    max_target_positions: int = 128


def whisper_config(tokenizer, size: WhisperSize) -> WhisperConfig:
    """A WhisperConfig over `tokenizer`'s vocabulary and special tokens, without dropout."""
    end_id = tokenizer.eos_token_id
    return WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=size.n_mels, d_model=size.width,
        encoder_layers=size.layers, decoder_layers=size.layers, encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn, decoder_ffn_dim=size.ffn, max_source_positions=FeatureShape(size.n_mels, size.window_seconds * 100).n_frames // 2,
        max_target_positions=size.max_target_positions, decoder_start_token_id=tokenizer.convert_tokens_to_ids(START),
        eos_token_id=end_id, pad_token_id=end_id, bos_token_id=end_id, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        begin_suppress_tokens=None, suppress_tokens=None,
    )


def random_whisper(tokenizer, size: WhisperSize = WhisperSize(), seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(whisper_config(tokenizer, size)).eval()


def write_random_whisper(directory: str | Path, tokenizer, size: WhisperSize = WhisperSize(), seed: int = 0) -> Path:
    """Save a random model with `tokenizer` and the matching feature extractor into `directory`."""
    directory = Path(directory)
    model = random_whisper(tokenizer, size, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    feature_extractor_for(model.config).save_pretrained(directory)
    return directory
