"""The models runtime_bench.py runs: a Llama-2-7B-shaped transformers Llama with random weights whose decoder linears
are random 4-bit g128 QuantLinears (or an EXL2 checkpoint of the same shape for ExLlamaV2), and SmolLM2 (float from
the carried GGUF, and GPTQ 4-bit quantized from it with qtool's library API). --tiny swaps each for a tiny random
Llama so that every path runs on a CPU in seconds."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from decode import random_quant_linear  # bench/runtime/decode.py: random GPTQ v2 tensors of unit output scale

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY_LLAMA = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    # eos/bos/pad outside the ids the benches draw (1..vocab-1) would not matter: every system runs past eos
    return LlamaConfig(**(TINY_LLAMA if tiny else LLAMA2_7B), rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_llama(tiny: bool, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A transformers LlamaForCausalLM with transformers' own random init, built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(tiny), dtype=dtype)
    return model.eval()


def quantize_linears_randomly(model: nn.Module, bits: int = 4, group_size: int = 128, seed: int = 0) -> int:
    """Replace every decoder linear by a random GPTQ QuantLinear of the same shape (lm_head stays float, as in a
    GPTQ checkpoint); returns how many. Each float weight is freed as its replacement arrives."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    count = 0
    for layer in model.model.layers:
        for path in DECODER_LINEARS:
            parent_name, _, leaf = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, leaf)
            setattr(parent, leaf, random_quant_linear(old.in_features, old.out_features, bits, group_size, gen, device))
            del old
            count += 1
    return count


def set_backend(model: nn.Module, device: torch.device) -> dict:
    from qtool.kernels.quant_linear import set_model_backend

    return set_model_backend(model, "triton" if device.type == "cuda" else "torch")


# ---- EXL2 weights of the same shape, for ExLlamaV2 ----


def random_exl2_weight(k: int, n: int, device: torch.device, gen: torch.Generator, rows_per_group: int = 128):
    """An all-4-bit EXL2 weight, groups of 128 rows (ExLlamaV2's 4.0 bpw shape), random codes and permutation,
    scales sized like random_quant_linear's so activations keep unit scale."""
    from qtool.formats.exl2 import Exl2Weight

    groups = k // rows_per_group
    level = 8  # stored scale level (qs + 1): scale = level**2 * q_scale_max / 256
    target = 1 / (math.sqrt((16**2 - 1) / 12) * math.sqrt(k))
    return Exl2Weight(
        codes=torch.randint(0, 16, (k, n), generator=gen, device=device, dtype=torch.int32),
        qscale=torch.full((groups, n), level, dtype=torch.int32, device=device),
        scale_max=torch.full((groups,), target / level**2 * 256, dtype=torch.float16, device=device),
        group_bits=(4,) * groups,
        group_sizes=(rows_per_group,) * groups,
        perm=torch.randperm(k, generator=gen, device=device),
    )


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly vocab_size ids (ExLlamaV2 decodes every id the model may sample,
    and its generator needs a tokenizer.json); the pieces are made-up words, the prompts are ids anyway."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {piece: i for i, piece in enumerate(["<unk>", "<s>", "</s>"] + sorted(alphabet))}
    letters = "abcdefghijklmnopqrstuvwxyz"
    index = 0
    while len(vocab) < vocab_size:
        word, value = "", index
        while True:
            word, value = letters[value % 26] + word, value // 26
            if value == 0:
                break
        vocab.setdefault("Ġ" + word, len(vocab))
        index += 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_random_exl2(model: nn.Module, directory: Path, seed: int = 0) -> dict:
    """An EXL2 checkpoint of `model`'s shape (float embedding, norms and head from `model`, random 4-bit decoder
    linears) at `directory`, readable by ExLlamaV2 0.3.2; returns its bits per weight and the seconds it took.
    Each linear is packed as soon as it is drawn: a 7B model's unpacked int32 codes would take 26 GB."""
    from qtool.checkpoints.exl2_checkpoint import build_exl2_config
    from qtool.checkpoints.gptq_checkpoint import DEFAULT_MAX_SHARD_SIZE_BYTES, checkpoint_state, model_config_dict, write_model_files
    from qtool.formats.exl2 import exl2_tensors_from_weight

    began = time.perf_counter()
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    packed, bits, weights, first = {}, 0, 0, None
    for index, layer in enumerate(model.model.layers):
        for path in DECODER_LINEARS:
            linear, name = layer.get_submodule(path), f"model.layers.{index}.{path}"
            weight = random_exl2_weight(linear.in_features, linear.out_features, device, gen)
            packed[name] = {k: v.cpu() for k, v in exl2_tensors_from_weight(weight, name).items()}
            bits += weight.storage_bits()
            weights += weight.in_features * weight.out_features
            first = first or (name, weight)
            del weight
    bpw = bits / weights
    # quantization_config as ExLlamaV2's converter writes it; bits measured over every linear above
    quantization = build_exl2_config(dict([first]), {"bits": round(bpw, 2), "calibration": {"dataset": "random codes"}})
    tensors, untie = checkpoint_state(model, packed)
    directory.mkdir(parents=True, exist_ok=True)
    write_model_files(directory, model, tensors, model_config_dict(model, quantization, untie),
                      synthetic_tokenizer(model.config.vocab_size), DEFAULT_MAX_SHARD_SIZE_BYTES)
    return {"bits_per_weight": round(bpw, 3), "write_s": round(time.perf_counter() - began, 1)}


# ---- SmolLM2 (or a tiny stand-in) ----


@dataclass
class SmolModels:
    """Where the float model comes from and the GPTQ checkpoint made from it."""

    float_source: str  # a .gguf file or a float HF directory
    gptq_dir: Path
    quantize_s: float
    calibration: dict


def tiny_float_dir(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama saved with a tokenizer trained on a little text: the stand-in for SmolLM2 in --tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    model = random_llama(True, torch.float32, torch.device("cpu"), seed)
    model.save_pretrained(str(directory))
    words = "once upon a time there lived a king and a queen who had no children the king said".split()
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(words)] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))
    return directory


def random_float_dir(shape_dir: Path, directory: Path, seed: int = 0) -> Path:
    """A float model directory with `shape_dir`'s config and tokenizer and random weights (transformers' own
    initialisation, seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(shape_dir)))
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(shape_dir)).save_pretrained(str(directory))
    return directory


def prepare_smollm2(float_source: str, calibration_file: Path, work: Path, device: torch.device, samples: int,
                    seqlen: int) -> SmolModels:
    """GPTQ 4-bit g128 of the float model through qtool's library API (the calibration's size only moves the
    weights' values, not the speed measured here)."""
    from qtool.config.schema import CalibrationConfig, QuantConfig
    from qtool.quant.pipeline import quantize_model

    calibration = CalibrationConfig(source=str(calibration_file), samples=samples, seqlen=seqlen, seed=0)
    config = QuantConfig(bits=4, group_size=128, calibration=calibration)
    began = time.perf_counter()
    out = work / "smollm2-gptq-4bit"
    quantize_model(float_source, config, out, device=device.type, force=True)
    return SmolModels(float_source, out, round(time.perf_counter() - began, 1),
                      {"file": calibration_file.name, "samples": samples, "seqlen": seqlen})


def load(source: str | Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) through qtool's loader: a GPTQ directory keeps its QuantLinears (Triton on CUDA; on the CPU
    what `qtool run` takes, cpu-int4 for 4-bit layers, rather than the torch reference that dequantizes every call)."""
    from qtool.checkpoints.sources import load_model

    loaded = load_model(str(source), device=str(device), dtype=dtype,
                        backend="triton" if device.type == "cuda" else "auto", for_generation=True)
    return loaded.model.eval(), loaded.tokenizer
