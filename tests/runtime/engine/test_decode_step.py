"""The whole-tensor decode step against the module path (float32, tiny random models of the families it takes):
equal logits and cache writes for ragged contexts, padded rows that write nothing, the per-model decision and its
reason, the RoPE table against the rotary module, and greedy output equal to transformers' generate."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.cuda_graphs import graph_batch_sizes
from qtool.runtime.engine.decode_step import DecodeInputs, DecodeRows, rope_table, rope_table_problem
from qtool.runtime.engine.model_runner import ENGINE_FAMILIES, ModelRunner

FAST_FAMILIES = ["llama", "qwen3", "gemma", "mistral", "granite", "qwen2"]
# prompts of ragged lengths, longer than the tiny models' sliding windows (4) and spanning several blocks of 4
PROMPTS = [[1, 5, 9], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89],
           [1, 60, 61, 62, 63, 64]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def decoding_engine(model, prompts=PROMPTS, steps: int = 3):
    """An engine (fast decode on) whose requests are prefilled and `steps` tokens in, and its next step's chunks
    (one-token decodes of ragged contexts)."""
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, fast_decode=True))
    for prompt in prompts:
        engine.add_request(prompt, GREEDY)
    for _ in range(steps):
        engine.step()
    chunks = engine.scheduler.schedule()
    assert chunks and all(chunk.num_tokens == 1 for chunk in chunks)
    return engine, chunks


def cache_copy(runner: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
    return runner.cache.key.clone(), runner.cache.value.clone()


def restore(runner: ModelRunner, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
    runner.cache.key.copy_(saved[0])
    runner.cache.value.copy_(saved[1])


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_decode_step_equals_the_module_path(family, build_family):
    seed = {"granite": dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.5)}
    model = build_family(family, seed=3, **seed.get(family, {}))
    engine, chunks = decoding_engine(model)
    runner = engine.runner
    assert runner.decode_step is not None, runner.decode_step_reason
    before = cache_copy(runner)
    expected = runner.execute_modules(chunks)
    expected_cache = cache_copy(runner)
    restore(runner, before)
    steps = runner.fast_decode_steps
    got = runner.execute(chunks)
    assert runner.fast_decode_steps == steps + 1, "execute took the decode step"
    assert got.shape == expected.shape == (len(PROMPTS), model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runner.cache.key, expected_cache[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runner.cache.value, expected_cache[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(runner.cache.key, before[0]), "the step wrote its keys"


def padded(inputs: DecodeInputs, rows: int) -> DecodeInputs:
    """inputs with `rows` padded rows appended (as a captured batch pads them: slot -1, context 0)."""
    def extend(tensor, value):
        fill = torch.full((rows, *tensor.shape[1:]), value, dtype=tensor.dtype)
        return torch.cat([tensor, fill])

    return DecodeInputs(extend(inputs.input_ids, 0), extend(inputs.positions, 0), extend(inputs.block_tables, 0),
                        extend(inputs.context_lens, 0), extend(inputs.slots, -1))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padded_rows_change_nothing_and_never_write_the_cache(family, build_family):
    engine, chunks = decoding_engine(build_family(family, seed=5))
    runner = engine.runner
    rows = DecodeRows.from_chunks(chunks, runner.cache.block_size)
    width = max(len(table) for table in rows.block_tables) + 3  # wider tables than needed: as in a graph
    before = cache_copy(runner)
    with torch.inference_mode():
        alone = runner.decode_step(rows.to_inputs(runner.device))
        alone_cache = cache_copy(runner)
        restore(runner, before)
        with_padding = runner.decode_step(padded(rows.to_inputs(runner.device, width), 5))
    torch.testing.assert_close(with_padding[: len(rows)], alone, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(with_padding).all()
    # the real rows' slots hold the same K/V (within the rounding of a matmul with more rows); no other slot moved
    written = torch.zeros(runner.cache.key.shape[1] * runner.cache.block_size, dtype=torch.bool)
    written[torch.tensor(rows.slots)] = True
    for got, alone_part, old in zip((runner.cache.key, runner.cache.value), alone_cache, before):
        flat_got, flat_alone, flat_old = (t.flatten(1, 2) for t in (got, alone_part, old))
        torch.testing.assert_close(flat_got[:, written], flat_alone[:, written], rtol=1e-5, atol=1e-6)
        assert torch.equal(flat_got[:, ~written], flat_old[:, ~written])
        assert not torch.equal(flat_got[:, written], flat_old[:, written])
    restore(runner, before)
    with torch.inference_mode():
        runner.decode_step(padded(_empty_inputs(width), 4))
    assert torch.equal(runner.cache.key, before[0]) and torch.equal(runner.cache.value, before[1])


def _empty_inputs(width: int) -> DecodeInputs:
    empty = torch.empty(0, dtype=torch.long)
    return DecodeInputs(empty, empty, torch.empty(0, width, dtype=torch.int32), empty.to(torch.int32), empty)


@pytest.mark.parametrize("family", list(ENGINE_FAMILIES))
def test_the_decision_and_its_reason_per_family(family, build_family):
    model = build_family(family)
    runner = ModelRunner(model, num_blocks=8, block_size=4, fast_decode=True)
    reason = runner.decode_step_reason
    if family in FAST_FAMILIES:
        assert runner.decode_step is not None and reason.startswith("whole-tensor decode step"), reason
        assert ("silu_mul" in reason) == (family != "gemma")
        assert ("(1 + w)" in reason) == (family == "gemma")
        assert ("q/k norms" in reason) == (family == "qwen3")
        return
    assert runner.decode_step is None and reason.startswith("decode steps run through the model's modules")
    expected = {"olmo": "OlmoLayerNorm", "starcoder2": "LayerNorm", "mixtral": "MixtralSparseMoeBlock",
                "qwen2_moe": "Qwen2MoeSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
                # families whose recipe the decode step's ops cannot express: declined before any module is probed
                "gemma2": "sandwich-norm layers (norms on each branch's output), attention logit softcapping",
                "gemma3_text": "sandwich-norm layers (norms on each branch's output), a rotary embedding per layer type",
                "olmo2": "post-norm layers (norms on each branch's output), q/k norms over the whole projection",
                "olmo3": "q/k norms over the whole projection, a rotary embedding per layer type",
                "olmoe": "q/k norms over the whole projection", "phi3": "a fused qkv_proj",
                "helium": "interleaved RoPE pairs (rope_and_cache rotates halves)"}
    assert expected[family] in reason


def test_fast_decode_is_off_on_the_cpu_unless_asked(tiny_llama):
    default = ModelRunner(tiny_llama, num_blocks=8, block_size=4)
    assert default.decode_step is None and "off" in default.decode_step_reason
    assert ModelRunner(tiny_llama, num_blocks=8, block_size=4, fast_decode=False).decode_step is None


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_q8_cache_decodes_through_the_step_as_the_module_path_does(family, build_family):
    """The q8 cache's own write and attention ops (engine_ops' q8 references on the CPU): the same logits as the
    module path over the same q8 cache (attention in the rotated frame, within float rounding), the same codes and
    scales written; and greedy decoding gives the module path's tokens."""
    model = build_family(family, seed=7)
    config = EngineConfig(block_size=4, num_blocks=64, kv_cache="q8", fast_decode=True)
    engine = Engine(model, None, config)
    runner = engine.runner
    assert runner.cache.is_quantized and runner.decode_step is not None, runner.decode_step_reason
    assert "a q8 KV cache" in runner.decode_step_reason
    for prompt in PROMPTS:
        engine.add_request(prompt, GREEDY)
    for _ in range(3):
        engine.step()
    chunks = engine.scheduler.schedule()
    assert all(chunk.num_tokens == 1 for chunk in chunks)
    names = ("key_codes", "key_scales", "value_codes", "value_scales")
    before = {name: getattr(runner.cache, name).clone() for name in names}
    expected = runner.execute_modules(chunks)
    written = {name: getattr(runner.cache, name).clone() for name in names}
    for name in names:
        getattr(runner.cache, name).copy_(before[name])
    steps = runner.fast_decode_steps
    got = runner.execute(chunks)
    assert runner.fast_decode_steps == steps + 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name in names:
        assert torch.equal(getattr(runner.cache, name), written[name]), name
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    fast = Engine(model, None, config).generate(PROMPTS, params)
    modules = Engine(model, None, replace(config, fast_decode=False)).generate(PROMPTS, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in modules]


def test_a_norm_that_is_not_rmsnorm_keeps_the_module_path(make_tiny_llama):
    model = make_tiny_llama()
    layer = model.model.layers[1]
    layer.post_attention_layernorm = torch.nn.LayerNorm(model.config.hidden_size, eps=1e-5)
    runner = ModelRunner(model, num_blocks=8, block_size=4, fast_decode=True)
    assert runner.decode_step is None and "layer 1's MLP norm (LayerNorm)" in runner.decode_step_reason


ROPE_VARIANTS = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "llama3": dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "linear": dict(rope_type="linear", rope_theta=500.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_the_rope_table_is_the_rotary_module(variant, make_tiny_llama):
    model = make_tiny_llama(rope_parameters=ROPE_VARIANTS[variant])
    rotary = model.model.rotary_emb
    cos, sin = rope_table(rotary, 200, torch.float32, torch.device("cpu"))
    assert rope_table_problem(rotary, cos, sin) is None
    positions = torch.randperm(200, generator=torch.Generator().manual_seed(1))[:37].sort().values
    module_cos, module_sin = rotary(torch.empty(1, 1, 1), positions[None])
    assert torch.equal(cos[positions], module_cos[0]) and torch.equal(sin[positions], module_sin[0])
    if variant != "default":  # the scaling matters: the table is not the plain one
        plain = rope_table(make_tiny_llama(rope_parameters=ROPE_VARIANTS["default"]).model.rotary_emb, 200,
                           torch.float32, torch.device("cpu"))
        assert not torch.equal(plain[0], cos)


def test_longrope_whose_frequencies_depend_on_the_longest_position_is_refused(make_tiny_llama):
    half = 16 // 2  # head_dim 16
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * half, long_factor=[4.0] * half,
                original_max_position_embeddings=32)
    model = make_tiny_llama(rope_parameters=rope, max_position_embeddings=128)
    runner = ModelRunner(model, num_blocks=64, block_size=4, fast_decode=True)
    assert runner.decode_step is None and "rotary embedding" in runner.decode_step_reason


def _rtn_gptq_llama(model):
    from qtool.kernels.quant_linear import QuantLinear
    from qtool.quant.rtn import rtn_quantize

    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, attribute = name.rpartition(".")
            quantized = QuantLinear.from_quantized(rtn_quantize(module.weight.data, 4, 32).quantized)
            setattr(model.model.layers.get_submodule(parent), attribute, quantized)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "mistral", "granite", "gptq-llama"])
def test_greedy_with_the_decode_step_equals_transformers_generate(family, build_family, reference_greedy):
    model = _rtn_gptq_llama(build_family("llama", seed=2)) if family == "gptq-llama" else build_family(family, seed=2)
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=7,
                                              fast_decode=True))
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))
    expected = [reference_greedy(model, prompt, 10, [model.generation_config.eos_token_id]) for prompt in PROMPTS]
    assert [out.token_ids for out in outputs] == expected
    assert engine.runner.fast_decode_steps > 0


def test_graph_batch_sizes_and_the_setting():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    with pytest.raises(QtoolError, match="max_graph_batch"):
        EngineConfig(max_graph_batch=0)
