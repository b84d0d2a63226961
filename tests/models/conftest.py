"""Tiny random models of every family in the architecture table, built from transformers' own config classes (no
download), for the tests of this folder. `every_family` parametrizes a test (module scope) over all of them,
`moe_family` over the mixture-of-experts ones; `build_tiny(family, seed=0, **overrides)` builds one."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GQA = dict(num_key_value_heads=2)
MIXED_LAYERS = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
# family id -> (config class, overrides). Sliding windows are shorter than the test sequences, MoE models have a
# dense layer where the family allows one, and logit transforms are strong enough to matter.
TINY_FAMILIES = {
    "llama": ("LlamaConfig", GQA),
    "mistral": ("MistralConfig", dict(GQA, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "gemma": ("GemmaConfig", dict(GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=16, final_logit_softcapping=1.0, attn_logit_softcapping=0.05,
                                    **MIXED_LAYERS)),
    "gemma3_text": ("Gemma3TextConfig", dict(GQA, head_dim=16, final_logit_softcapping=1.0, **MIXED_LAYERS)),
    "olmo": ("OlmoConfig", GQA),
    "olmo2": ("Olmo2Config", GQA),
    "olmo3": ("Olmo3Config", dict(GQA, **MIXED_LAYERS)),
    "helium": ("HeliumConfig", dict(GQA, head_dim=16)),
    "granite": ("GraniteConfig", dict(GQA, logits_scaling=0.25, embedding_multiplier=3.0, residual_multiplier=0.5)),
    "stablelm": ("StableLmConfig", GQA),
    "stablelm-parallel": ("StableLmConfig", dict(GQA, use_parallel_residual=True)),
    "cohere": ("CohereConfig", dict(GQA, logit_scale=4.0)),
    "cohere2": ("Cohere2Config", dict(GQA, logit_scale=4.0, **MIXED_LAYERS)),
    "phi3": ("Phi3Config", dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=1,
                                partial_rotary_factor=0.5, sliding_window=4)),
    "phi": ("PhiConfig", GQA),
    "starcoder2": ("Starcoder2Config", dict(GQA, sliding_window=4)),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "mixtral": ("MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             mlp_only_layers=[1]),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2),
    ),
    "olmoe": ("OlmoeConfig", dict(GQA, num_experts=4, num_experts_per_tok=2)),
}


def build_tiny_family(family: str, seed: int = 0, **overrides) -> nn.Module:
    config_class, fields = TINY_FAMILIES[family]
    config = getattr(transformers, config_class)(**{**TINY_COMMON, **fields, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def pytest_generate_tests(metafunc):
    if "every_family" in metafunc.fixturenames:
        metafunc.parametrize("every_family", list(TINY_FAMILIES), scope="module")
    if "moe_family" in metafunc.fixturenames:
        from qtool.models.architectures import REGISTRY

        metafunc.parametrize("moe_family", [name for name in TINY_FAMILIES if REGISTRY[name.split("-")[0]].moe is not None])


@pytest.fixture(scope="session")
def build_tiny():
    return build_tiny_family


@pytest.fixture(scope="session")
def tiny_families() -> dict:
    return TINY_FAMILIES


@pytest.fixture(scope="session")
def tiny_common() -> dict:
    return TINY_COMMON
