"""The executor against transformers: greedy output token-identical to `generate` for every family it takes (tiny
random models, prompts longer than the sliding windows, prefills chunked), batched equal to alone, the RoPE layouts
against transformers' own, Gemma 2's softcaps, GPTQ and EXL2 llamas, and the refusals."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams, engine_support
from qtool.runtime.engine.model_runner import (ENGINE_FAMILIES, NORM_PLACEMENTS, NOT_TAKEN, QK_NORM_SCOPES, ROPE_LAYOUTS,
                                               ModelRunner, apply_rope)

PROMPTS = [[1, 5, 9, 14, 3], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 77]]
NEW_TOKENS = 8


def engine_greedy(model, prompts, **config) -> list[list[int]]:
    settings = dict(block_size=4, num_blocks=32, max_num_batched_tokens=7)  # a budget of 7 chunks the 11-token prompt
    settings.update(config)
    engine = Engine(model, None, EngineConfig(**settings))
    return [out.token_ids for out in engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))]


def test_engine_families_are_in_the_architecture_table():
    from qtool.models.architectures import REGISTRY

    assert set(ENGINE_FAMILIES) <= set(REGISTRY)
    # the list: Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 text, Phi-3, OLMo2, Granite and an MoE family
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite",
            "mixtral"} <= set(ENGINE_FAMILIES)
    assert not set(ENGINE_FAMILIES) & set(NOT_TAKEN)
    for recipe in ENGINE_FAMILIES.values():  # every recipe names forms _layer and apply_rope know
        assert recipe.norm_placement in NORM_PLACEMENTS and recipe.rope_layout in ROPE_LAYOUTS
        assert recipe.qk_norm in (None, *QK_NORM_SCOPES)


def test_greedy_matches_transformers_generate_or_is_refused(tiny_family, build_family, reference_greedy):
    model = build_family(tiny_family)
    reason = engine_support(model)
    if model.config.model_type not in ENGINE_FAMILIES:
        assert isinstance(reason, str) and model.config.model_type in reason
        with pytest.raises(QtoolError, match="does not run model type"):
            ModelRunner(model, num_blocks=4, block_size=4)
        return
    assert reason is None
    eos = [model.generation_config.eos_token_id]
    expected = [reference_greedy(model, prompt, NEW_TOKENS, eos) for prompt in PROMPTS]
    assert engine_greedy(model, PROMPTS) == expected


def test_batched_equals_alone(tiny_family, build_family):
    """Each request's greedy tokens are the same whether it runs alone or in a batch whose prefills are chunked."""
    model = build_family(tiny_family, seed=4)
    if engine_support(model) is not None:
        pytest.skip("a family the engine does not take")
    prompts = [[1, 5, 9, 14, 3, 8, 21], list(range(40, 53)), [1, 77]]

    def run(batch, **settings):
        engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, **settings))
        greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        return [out.token_ids for out in engine.generate(batch, greedy)]

    assert run(prompts, max_num_batched_tokens=5) == [run([prompt])[0] for prompt in prompts]


def _rope_inputs(seed: int, tokens: int, heads: int, head_dim: int, rotary_dim: int):
    """x [T, heads, d] and a rotary module's cos/sin [T, rotary_dim] (frequencies repeated: [f, f])."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=generator, dtype=torch.float64)
    freqs = torch.rand(tokens, rotary_dim // 2, generator=generator, dtype=torch.float64) * 20
    angles = torch.cat((freqs, freqs), dim=-1)
    return x, angles.cos(), angles.sin()


@pytest.mark.parametrize("family, layout, rotary_dim", [("helium", "interleaved", 16), ("llama", "half", 16),
                                                         ("phi3", "half", 6)])
def test_apply_rope_is_the_familys_own(family, layout, rotary_dim):
    import importlib

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    x, cos, sin = _rope_inputs(1, 7, 3, 16, rotary_dim)
    # transformers' layout: [batch, heads, T, d] and cos/sin [batch, T, rotary dims]
    hf = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731
    expected, _ = modeling.apply_rotary_pos_emb(hf(x), hf(x), cos.unsqueeze(0), sin.unsqueeze(0))
    got = apply_rope(x, cos, sin, layout)
    torch.testing.assert_close(got, expected[0].transpose(0, 1), rtol=1e-12, atol=1e-12)
    other = apply_rope(x, cos, sin, "half" if layout == "interleaved" else "interleaved")
    assert (other - got).abs().max() > 0.1  # the two layouts are not the same rotation


def test_gemma2_softcaps_matter(build_family, reference_greedy):
    """Strong weights, so the attention softcap (and the final one, head_logits') change the logits by far more than
    float32 rounding: the engine's prompt logits are still the model's own, and its greedy tokens generate's."""
    model = build_family("gemma2", seed=1, initializer_range=0.1, attn_logit_softcapping=0.5,
                         final_logit_softcapping=3.0)
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    assert runner.attention_softcap == 0.5
    ids = torch.randint(3, model.config.vocab_size, (19,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids.unsqueeze(0), use_cache=False).logits[0].float()
        uncapped = build_family("gemma2", seed=1, initializer_range=0.1, attn_logit_softcapping=None,
                                final_logit_softcapping=3.0)(ids.unsqueeze(0), use_cache=False).logits[0].float()
    assert (uncapped - expected).abs().max() > 1e-2
    torch.testing.assert_close(runner.prompt_logits(ids), expected, rtol=1e-5, atol=1e-5)
    eos = [model.generation_config.eos_token_id]
    assert engine_greedy(model, PROMPTS) == [reference_greedy(model, p, NEW_TOKENS, eos) for p in PROMPTS]


def _rtn_gptq_llama(tiny_llama, bits: int = 4, group_size: int = 32):
    """The tiny llama with every decoder linear replaced by a QuantLinear holding its RTN-quantized weight."""
    from qtool.kernels.quant_linear import QuantLinear
    from qtool.quant.rtn import rtn_quantize

    for name, module in list(tiny_llama.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            quantized = rtn_quantize(module.weight.data, bits, group_size).quantized
            parent, _, attribute = name.rpartition(".")
            setattr(tiny_llama.model.layers.get_submodule(parent), attribute, QuantLinear.from_quantized(quantized))
    return tiny_llama


def test_greedy_of_a_gptq_quantized_llama_matches_transformers(tiny_llama, reference_greedy):
    from qtool.kernels.quant_linear import QuantLinear

    model = _rtn_gptq_llama(tiny_llama)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert engine_support(model) is None
    eos = [model.generation_config.eos_token_id]
    expected = [reference_greedy(model, prompt, NEW_TOKENS, eos) for prompt in PROMPTS]
    assert engine_greedy(model, PROMPTS) == expected


def test_granite_multipliers_matter(build_family, reference_greedy):
    # strong multipliers, so a missing one changes the tokens
    model = build_family("granite", embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.5)
    eos = [model.generation_config.eos_token_id]
    assert engine_greedy(model, PROMPTS) == [reference_greedy(model, p, NEW_TOKENS, eos) for p in PROMPTS]


def test_llama3_rope_scaling_comes_from_the_model(make_tiny_llama, reference_greedy):
    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8)
    model = make_tiny_llama(rope_parameters=rope)
    eos = [model.generation_config.eos_token_id]
    assert engine_greedy(model, PROMPTS) == [reference_greedy(model, p, NEW_TOKENS, eos) for p in PROMPTS]


def test_dynamic_rope_is_refused(make_tiny_llama):
    model = make_tiny_llama(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    assert "dynamic" in engine_support(model)


def test_olmo_with_clip_qkv_is_refused(build_family):
    assert engine_support(build_family("olmo")) is None
    assert "clip_qkv" in engine_support(build_family("olmo", clip_qkv=8.0))


def test_logits_only_for_chunks_that_reach_the_last_token(tiny_llama):
    engine = Engine(tiny_llama, None, EngineConfig(block_size=4, num_blocks=16, max_num_batched_tokens=4))
    engine.add_request(list(range(1, 11)), SamplingParams(max_tokens=2, temperature=0))
    chunks = engine.scheduler.schedule()
    assert [c.num_tokens for c in chunks] == [4] and not chunks[0].samples
    assert engine.runner.execute(chunks).shape == (0, tiny_llama.config.vocab_size)


def test_greedy_of_an_exl2_llama_matches_transformers(tiny_llama, make_random_exl2_weights, reference_greedy):
    from qtool.kernels.exl2_linear import Exl2Linear

    for name, weight in make_random_exl2_weights(tiny_llama, seed=3).items():
        parent, _, attribute = name.rpartition(".")
        setattr(tiny_llama.get_submodule(parent), attribute, Exl2Linear.from_weight(weight))
    assert isinstance(tiny_llama.model.layers[1].mlp.down_proj, Exl2Linear)
    eos = [tiny_llama.generation_config.eos_token_id]
    expected = [reference_greedy(tiny_llama, prompt, NEW_TOKENS, eos) for prompt in PROMPTS]
    assert engine_greedy(tiny_llama, PROMPTS) == expected
