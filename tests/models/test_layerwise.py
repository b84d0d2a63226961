"""Layer-by-layer execution (capture -> run each layer -> finish) against the model's own forward, for every
family in the architecture table, built tiny and random from transformers' config classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.models.architectures import (
    ARCHITECTURES,
    REGISTRY,
    ArchitectureSpec,
    build_registry,
    decoder_layers,
    get_architecture,
)
from qtool.models.layerwise import (
    capture_layer_inputs,
    finish,
    iter_layer_outputs,
    layerwise_logits,
    next_layer_inputs,
    sample_batches,
    run_layer,
)

ATOL = 1e-5


@pytest.fixture(scope="session")
def random_ids(tiny_common):
    def make(*shape: int, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, tiny_common["vocab_size"], shape, generator=generator)

    return make


def reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_families_match_the_table(tiny_families):
    assert {name.split("-")[0] for name in tiny_families} == set(REGISTRY)


def test_layer_by_layer_logits_equal_the_full_forward(every_family, build_tiny, random_ids):
    model = build_tiny(every_family)
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
def test_samples_of_different_lengths(family, build_tiny, random_ids):
    model = build_tiny(family)
    samples = [random_ids(5, seed=2), random_ids(11, seed=3), random_ids(1, 7, seed=4)]
    logits = layerwise_logits(model, samples)
    for sample, got in zip(samples, logits):
        expected = reference_logits(model, sample.reshape(1, -1))
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_intermediate_hidden_states_equal_those_of_the_full_forward(build_tiny, random_ids):
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


def test_samples_batch_only_with_equal_arguments_and_within_the_token_budget(build_tiny):
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


def test_each_layer_gets_its_own_arguments(build_tiny, random_ids):
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


def test_capture_runs_no_layer_restores_the_model_and_shares_arguments(build_tiny, random_ids):
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


def test_capture_restores_the_layers_when_the_forward_fails(build_tiny, tiny_common):
    model = build_tiny("llama")
    layers = decoder_layers(model)
    with pytest.raises(IndexError):
        capture_layer_inputs(model, torch.tensor([[1, 2, tiny_common["vocab_size"] + 5]]))
    assert decoder_layers(model) is layers
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def test_discovered_spec_runs_layer_by_layer_too(build_tiny, random_ids):
    model = build_tiny("mistral")
    registry = build_registry(tuple(s for s in ARCHITECTURES if "mistral" not in s.model_types))
    spec = get_architecture(model, registry=registry)
    assert spec.discovered
    ids = random_ids(2, 9)
    logits = torch.cat(layerwise_logits(model, ids, spec=spec))
    torch.testing.assert_close(logits, reference_logits(model, ids), atol=ATOL, rtol=0)


def test_finish_without_a_known_norm_is_an_error(build_tiny, tiny_common):
    model = build_tiny("llama")
    spec = ArchitectureSpec(model_types=("llama",), sequential_groups=(), norm_path=None)
    with pytest.raises(QtoolError, match="no final norm"):
        finish(model, torch.zeros(1, 3, tiny_common["hidden_size"]), spec=spec)


@pytest.mark.parametrize("bad", [torch.zeros(1, 2, 3, dtype=torch.long), [], [torch.zeros(0, dtype=torch.long)]])
def test_bad_input_ids_are_refused(bad, build_tiny):
    with pytest.raises(QtoolError):
        capture_layer_inputs(build_tiny("llama"), bad)


def test_layer_the_forward_never_reaches_is_reported(build_tiny, random_ids):
    model = build_tiny("llama")
    inputs = capture_layer_inputs(model, random_ids(1, 4))
    unreached = type(inputs)(layer_index=1, hidden_states=inputs.hidden_states, calls=((inputs.calls[0][0], None),))
    with pytest.raises(QtoolError, match="never reached decoder layer 1"):
        run_layer(decoder_layers(model)[1], unreached, 0)
