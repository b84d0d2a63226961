"""Layer-by-layer execution (capture -> run each layer -> finish) against the model's own forward, for every
family in the architecture table, built tiny and random from transformers' config classes."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from qtool.configs.errors import QtoolError
from qtool.runtime.architectures import (
    ARCHITECTURES,
    REGISTRY,
    ArchitectureSpec,
    build_registry,
    decoder_layers,
    get_architecture,
)
from qtool.runtime.layerwise import (
    capture_layer_inputs,
    finish,
    iter_layer_outputs,
    layerwise_logits,
    next_layer_inputs,
    sample_batches,
    run_layer,
)

COMMON = dict(
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
# Same families as test_architectures.py: sliding windows shorter than the sequences, layer types that differ
# between layer 0 and 1, logit transforms strong enough to matter, MoE models with a dense layer where possible.
FAMILIES = {
    "llama": ("LlamaConfig", GQA),
    "mistral": ("MistralConfig", dict(GQA, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "gemma": ("GemmaConfig", dict(GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=16, final_logit_softcapping=1.0, **MIXED_LAYERS)),
    "gemma3_text": ("Gemma3TextConfig", dict(GQA, head_dim=16, final_logit_softcapping=1.0, **MIXED_LAYERS)),
    "olmo": ("OlmoConfig", GQA),
    "olmo2": ("Olmo2Config", GQA),
    "olmo3": ("Olmo3Config", dict(GQA, **MIXED_LAYERS)),
    "helium": ("HeliumConfig", dict(GQA, head_dim=16)),
    "granite": ("GraniteConfig", dict(GQA, logits_scaling=0.25)),
    "stablelm": ("StableLmConfig", GQA),
    "stablelm-parallel": ("StableLmConfig", dict(GQA, use_parallel_residual=True)),
    "cohere": ("CohereConfig", dict(GQA, logit_scale=4.0)),
    "cohere2": ("Cohere2Config", dict(GQA, logit_scale=4.0, **MIXED_LAYERS)),
    "phi3": ("Phi3Config", GQA),
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
ATOL = 1e-5


def build_tiny(family: str, seed: int = 0, **overrides) -> nn.Module:
    config_class, fields = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **fields, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], shape, generator=generator)


def reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_families_match_the_table():
    assert {name.split("-")[0] for name in FAMILIES} == set(REGISTRY)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_by_layer_logits_equal_the_full_forward(family):
    model = build_tiny(family)
    ids = random_ids(2, 9)
    assert not torch.equal(ids[0], ids[1])
    inputs = capture_layer_inputs(model, ids)
    assert len(inputs) == 2 and inputs.layer_index == 0
    for index, layer in enumerate(decoder_layers(model)):
        assert inputs.layer_index == index
        inputs = next_layer_inputs(layer, inputs)
    logits = torch.cat([finish(model, hidden) for hidden in inputs.hidden_states])
    expected = reference_logits(model, ids)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the two samples really differ


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe", "cohere2"])
def test_samples_of_different_lengths(family):
    model = build_tiny(family)
    samples = [random_ids(5, seed=2), random_ids(11, seed=3), random_ids(1, 7, seed=4)]
    logits = layerwise_logits(model, samples)
    for sample, got in zip(samples, logits):
        expected = reference_logits(model, sample.reshape(1, -1))
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_intermediate_hidden_states_equal_those_of_the_full_forward():
    model = build_tiny("llama", num_hidden_layers=3)
    ids = random_ids(2, 9)
    seen: dict[int, torch.Tensor] = {}
    layers = decoder_layers(model)
    handles = [
        layer.register_forward_hook(lambda module, args, output, i=i: seen.__setitem__(i, output))
        for i, layer in enumerate(layers)
    ]
    try:
        reference_logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    inputs = capture_layer_inputs(model, ids)
    for index, layer in enumerate(layers):
        singles = [run_layer(layer, inputs, sample) for sample in range(len(inputs))]
        streamed = list(iter_layer_outputs(layer, inputs))
        for sample in range(2):
            torch.testing.assert_close(singles[sample], seen[index][sample : sample + 1], atol=ATOL, rtol=0)
            torch.testing.assert_close(streamed[sample], singles[sample], atol=ATOL, rtol=0)  # batched: other blocking
        inputs = next_layer_inputs(layer, inputs)


def test_samples_batch_only_with_equal_arguments_and_within_the_token_budget():
    model = build_tiny("llama", num_hidden_layers=2)
    gen = torch.Generator().manual_seed(5)
    lengths = [8, 8, 8, 5, 5, 8, 8]
    samples = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    inputs = capture_layer_inputs(model, samples)
    # equal lengths share their rotary tables, hence batch; a length change or the budget starts a new batch
    assert sample_batches(inputs, max_tokens=16) == [(0, 1), (2,), (3, 4), (5, 6)]
    assert sample_batches(inputs, max_tokens=4096) == [(0, 1, 2), (3, 4), (5, 6)]
    assert sample_batches(inputs, max_tokens=1) == [(i,) for i in range(7)]
    layer = decoder_layers(model)[0]
    batched = list(iter_layer_outputs(layer, inputs, max_tokens=4096))
    for sample in range(7):
        single = run_layer(layer, inputs, sample)
        assert batched[sample].shape == single.shape == (1, lengths[sample], model.config.hidden_size)
        torch.testing.assert_close(batched[sample], single, atol=ATOL, rtol=0)
        assert batched[sample].untyped_storage().nbytes() == single.numel() * single.element_size()  # own storage


def test_each_layer_gets_its_own_arguments():
    """Gemma 3 gives sliding and full-attention layers different masks and rotary tables: reusing layer 0's
    arguments for layer 1 would change the logits, so the capture must keep them per layer."""
    model = build_tiny("gemma3_text")
    ids = random_ids(1, 9)
    inputs = capture_layer_inputs(model, ids)
    first, second = inputs.calls[0]
    sliding_mask, full_mask = first.kwargs["attention_mask"], second.kwargs["attention_mask"]
    assert sliding_mask is not None and (full_mask is None or not torch.equal(sliding_mask, full_mask))
    assert not torch.equal(first.kwargs["position_embeddings"][0], second.kwargs["position_embeddings"][0])

    layers = decoder_layers(model)
    wrong = type(inputs)(layer_index=0, hidden_states=inputs.hidden_states, calls=((first, first),))
    right_out, wrong_out = inputs, wrong
    for layer in layers:
        right_out, wrong_out = next_layer_inputs(layer, right_out), next_layer_inputs(layer, wrong_out)
    right, misused = finish(model, right_out.hidden_states[0]), finish(model, wrong_out.hidden_states[0])
    torch.testing.assert_close(right, reference_logits(model, ids), atol=ATOL, rtol=0)
    assert (right - misused).abs().max() > 100 * ATOL


def test_capture_runs_no_layer_restores_the_model_and_shares_arguments():
    model = build_tiny("gemma2", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    layers = decoder_layers(model)
    original = list(layers)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in layers]
    inputs = capture_layer_inputs(model, random_ids(2, 9))
    for handle in handles:
        handle.remove()
    assert calls == []  # no decoder layer computed anything during the capture
    assert decoder_layers(model) is layers and list(decoder_layers(model)) == original
    assert all(h.device.type == "cpu" for h in inputs.hidden_states)
    kwargs = [[call.kwargs for call in sample] for sample in inputs.calls]
    # equal-length samples and same-type layers share one stored copy of each argument
    assert kwargs[0][0]["position_ids"] is kwargs[1][0]["position_ids"]
    assert kwargs[0][0]["attention_mask"] is kwargs[1][2]["attention_mask"]
    assert kwargs[0][1]["attention_mask"] is kwargs[1][3]["attention_mask"]
    assert kwargs[0][0]["attention_mask"] is not kwargs[0][1]["attention_mask"]
    assert all(k.get("past_key_values") is None for sample in kwargs for k in sample)


def test_capture_restores_the_layers_when_the_forward_fails():
    model = build_tiny("llama")
    layers = decoder_layers(model)
    with pytest.raises(IndexError):
        capture_layer_inputs(model, torch.tensor([[1, 2, COMMON["vocab_size"] + 5]]))
    assert decoder_layers(model) is layers
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def test_discovered_spec_runs_layer_by_layer_too():
    model = build_tiny("mistral")
    registry = build_registry(tuple(s for s in ARCHITECTURES if "mistral" not in s.model_types))
    spec = get_architecture(model, registry=registry)
    assert spec.discovered
    ids = random_ids(2, 9)
    logits = torch.cat(layerwise_logits(model, ids, spec=spec))
    torch.testing.assert_close(logits, reference_logits(model, ids), atol=ATOL, rtol=0)


def test_finish_without_a_known_norm_is_an_error():
    model = build_tiny("llama")
    spec = ArchitectureSpec(model_types=("llama",), sequential_groups=(), norm_path=None)
    with pytest.raises(QtoolError, match="no final norm"):
        finish(model, torch.zeros(1, 3, COMMON["hidden_size"]), spec=spec)


@pytest.mark.parametrize("bad", [torch.zeros(1, 2, 3, dtype=torch.long), [], [torch.zeros(0, dtype=torch.long)]])
def test_bad_input_ids_are_refused(bad):
    with pytest.raises(QtoolError):
        capture_layer_inputs(build_tiny("llama"), bad)


def test_layer_the_forward_never_reaches_is_reported():
    model = build_tiny("llama")
    inputs = capture_layer_inputs(model, random_ids(1, 4))
    unreached = type(inputs)(layer_index=1, hidden_states=inputs.hidden_states, calls=((inputs.calls[0][0], None),))
    with pytest.raises(QtoolError, match="never reached decoder layer 1"):
        run_layer(decoder_layers(model)[1], unreached, 0)
