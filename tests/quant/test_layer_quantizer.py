"""One decoder layer quantized group by group: replaying what can no longer change gives exactly what computing
everything again gives, and each group's Hessian comes from the outputs of the groups quantized before it."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from qtool.configs.schema import QuantConfig
from qtool.quant.layer_quantizer import quantize_layer
from qtool.runtime.architectures import decoder_layers, get_architecture, resolve_layer_groups
from qtool.runtime.layerwise import capture_layer_inputs, run_layer


def layer_job(model, index: int = 0):
    spec = get_architecture(model)
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, model.config.vocab_size, (1, 24), generator=gen) for _ in range(4)]
    inputs = capture_layer_inputs(model, ids, spec=spec)
    prefix = f"{spec.layers_path}.{index}."
    layer = decoder_layers(model, spec)[index]
    groups = [[(name.removeprefix(prefix), linear) for name, linear in group] for group in resolve_layer_groups(model, index, spec)]
    return layer, groups, inputs


def run_quantize_layer(model, config: QuantConfig, replay: bool):
    model = copy.deepcopy(model)
    layer, groups, inputs = layer_job(model)
    return quantize_layer(layer, groups, len(inputs), lambda i: run_layer(layer, inputs, i), config, torch.device("cpu"), replay=replay)


@pytest.mark.parametrize("fields", [dict(bits=4, group_size=32), dict(bits=3, group_size=-1, sym=False, desc_act=True)])
def test_replay_equals_recomputing_everything(tiny_llama, fields):
    config = replace(QuantConfig(), **fields)
    q_replay, _, out_replay = run_quantize_layer(tiny_llama, config, replay=True)
    q_full, _, out_full = run_quantize_layer(tiny_llama, config, replay=False)
    assert sorted(q_replay) == sorted(q_full) and len(q_full) == 7
    for name in q_full:
        assert torch.equal(q_replay[name].codes, q_full[name].codes), name
        assert torch.equal(q_replay[name].scales, q_full[name].scales), name
    for a, b in zip(out_replay, out_full):
        assert torch.equal(a, b)


def test_outputs_are_those_of_the_quantized_layer(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    layer, groups, inputs = layer_job(model)
    quantized, reports, outputs = quantize_layer(layer, groups, len(inputs), lambda i: run_layer(layer, inputs, i), QuantConfig(bits=4, group_size=32), torch.device("cpu"))
    # the layer now holds the fake-quantized weights: running it again gives the returned outputs
    for name, qw in quantized.items():
        assert torch.equal(layer.get_submodule(name).weight.data, qw.dequantize())
    for i, out in enumerate(outputs):
        assert torch.allclose(run_layer(layer, inputs, i), out, atol=1e-6)
    assert [r.name for r in reports] == [name for group in groups for name, _ in group]


def test_true_sequential_changes_later_groups_only(tiny_llama):
    sequential = run_quantize_layer(tiny_llama, QuantConfig(bits=3, group_size=32), replay=True)[0]
    parallel = run_quantize_layer(tiny_llama, QuantConfig(bits=3, group_size=32, true_sequential=False), replay=True)[0]
    # the first group sees the same float input either way; o_proj's input depends on the quantized q/k/v
    assert torch.equal(sequential["self_attn.q_proj"].codes, parallel["self_attn.q_proj"].codes)
    assert not torch.equal(sequential["self_attn.o_proj"].codes, parallel["self_attn.o_proj"].codes)
