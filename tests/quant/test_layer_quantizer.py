"""One decoder layer quantized group by group: replaying what can no longer change gives exactly what computing
everything again gives, and each group's Hessian comes from the outputs of the groups quantized before it."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from qtool.config.schema import QuantConfig
from qtool.quant.layer_quantizer import quantize_layer
from qtool.models.architectures import decoder_layers, get_architecture, resolve_layer_groups
from qtool.models.layerwise import capture_layer_inputs, run_layer


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


def quantize_counting_attention(model, config: QuantConfig, **options):
    """quantize_layer on a copy of `model`'s first layer with o_proj declared as attention's output projection:
    (the layer, the result, how many times the attention block completed)."""
    layer, groups, inputs = layer_job(copy.deepcopy(model))
    calls = []
    handle = layer.self_attn.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        result = quantize_layer(layer, groups, len(inputs), lambda i: run_layer(layer, inputs, i), config, torch.device("cpu"),
                                output_projections=(("self_attn", "self_attn.o_proj"),), **options)
    finally:
        handle.remove()
    return layer, result, len(calls)


def assert_equals_recomputing_everything(result, model, config: QuantConfig) -> None:
    quantized, _, outputs = result
    q_full, _, out_full = run_quantize_layer(model, config, replay=False)
    for name in q_full:
        assert torch.equal(quantized[name].codes, q_full[name].codes), name
    for a, b in zip(outputs, out_full):
        assert torch.equal(a, b)


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


@pytest.mark.parametrize("fields", [dict(bits=4, group_size=32), dict(bits=3, group_size=-1, sym=False, desc_act=True)])
def test_projection_shortcut_equals_recomputing_and_skips_the_attention(tiny_llama, fields):
    """With o_proj declared as attention's output projection, attention is computed once fewer per batch and
    everything comes out bit-equal to recomputing the whole layer in every pass."""
    config = replace(QuantConfig(), **fields)
    _, result, attention_calls = quantize_counting_attention(tiny_llama, config)
    assert_equals_recomputing_everything(result, tiny_llama, config)
    # attention completes only in the check of the first batch (the o pass stops inside it, later passes replay)
    assert attention_calls == 1


def test_recordings_inside_a_child_that_replays_whole_are_dropped(tiny_llama, monkeypatch):
    """Once the attention block replays whole, the q/k/v outputs recorded inside it are never read again: they are
    dropped (a 7B's 128 x 2048 calibration tokens: 12 GiB of float32), and the layer comes out as before."""
    import qtool.quant.layer_quantizer as layer_quantizer

    made = []

    class Tracked(layer_quantizer.RecordingModule):
        def __init__(self, module, store_device):
            super().__init__(module, store_device)
            made.append(self)

    monkeypatch.setattr(layer_quantizer, "RecordingModule", Tracked)
    config = QuantConfig(bits=4, group_size=32)
    model = copy.deepcopy(tiny_llama)
    layer, groups, inputs = layer_job(model)
    names = {id(module): name for name, module in layer.named_modules()}
    _, _, outputs = quantize_layer(layer, groups, len(inputs), lambda i: run_layer(layer, inputs, i), config,
                                   torch.device("cpu"), output_projections=(("self_attn", "self_attn.o_proj"),))
    inner = {names[id(r.module)]: r for r in made if names[id(r.module)].startswith("self_attn.")}
    assert sorted(inner) == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert all(not recorder.outputs for recorder in inner.values())
    assert any(recorder.outputs for recorder in made if names[id(recorder.module)] == "mlp.gate_proj")
    for a, b in zip(outputs, run_quantize_layer(tiny_llama, config, replay=False)[2]):
        assert torch.equal(a, b)


def test_projection_recorder_checks_the_shortcut_on_the_first_call():
    from qtool.quant.replay import ProjectionRecorder

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(8, 8)
    inputs = [torch.randn(2, 8, generator=gen) for _ in range(3)]
    right = torch.nn.Sequential(torch.nn.Identity(), linear)  # its output is linear's output
    wrong = torch.nn.Sequential(linear, torch.nn.ReLU())  # something runs after the linear
    for child, shortcut in ((right, True), (wrong, False)):
        recorder = ProjectionRecorder(child, linear, list(inputs), torch.device("cpu"))
        calls = []
        handle = child.register_forward_hook(lambda module, args, output: calls.append(1))
        outputs = [recorder(x) for x in inputs]
        handle.remove()
        assert recorder.shortcut is shortcut
        assert len(calls) == (1 if shortcut else 3)
        for x, out in zip(inputs, outputs):
            assert torch.equal(out, child(x))
        assert len(recorder.outputs) == 3
        # the inputs are let go as they are used (or at once, where the shortcut does not hold)
        assert all(x is None for x in recorder.linear_inputs) if shortcut else recorder.linear_inputs == []


@pytest.mark.parametrize("fields", [dict(bits=4, group_size=32), dict(bits=3, group_size=-1, sym=False, desc_act=True)])
def test_replaying_finished_blocks_only_equals_recomputing_everything(tiny_llama, fields, monkeypatch):
    """The lean replay (memory for one hidden-sized recording): only the attention block is recorded, through its
    projection, never a linear nor a norm; attention completes once (the shortcut's check) and everything is
    bit-equal to recomputing the whole layer in every pass."""
    import qtool.quant.layer_quantizer as layer_quantizer

    made = []

    class Tracked(layer_quantizer.ProjectionRecorder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    class Refused(layer_quantizer.RecordingModule):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the lean replay records through the projection only")

    monkeypatch.setattr(layer_quantizer, "ProjectionRecorder", Tracked)
    monkeypatch.setattr(layer_quantizer, "RecordingModule", Refused)
    config = replace(QuantConfig(), **fields)
    layer, result, attention_calls = quantize_counting_attention(tiny_llama, config, replay=False, replay_blocks=True)
    assert len(made) == 1 and made[0].module is layer.self_attn and made[0].linear_inputs == []
    assert attention_calls == 1
    assert_equals_recomputing_everything(result, tiny_llama, config)


def test_compute_dtype_auto_follows_the_hardware(monkeypatch):
    from qtool.models.rules import resolve_compute_dtype

    assert resolve_compute_dtype("float16", torch.device("cpu")) is torch.float16
    assert resolve_compute_dtype("float32", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_compute_dtype("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_compute_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_compute_dtype("auto", torch.device("cuda")) is torch.float32
    # on a GPU, bfloat16 forwards from a 2048-wide model up (a 7B's 4096: its float32 GEMMs were most of a layer)
    assert resolve_compute_dtype("auto", torch.device("cuda"), hidden_size=576) is torch.float32
    assert resolve_compute_dtype("auto", torch.device("cuda"), hidden_size=4096) is torch.bfloat16
    assert resolve_compute_dtype("float32", torch.device("cuda"), hidden_size=4096) is torch.float32
    assert resolve_compute_dtype("auto", torch.device("cpu"), hidden_size=4096) is torch.float32


def test_bfloat16_forwards_stay_close_to_float32(tiny_llama):
    """Autocast changes the calibration activations by bfloat16 rounding only: the outputs of the quantized layer
    stay within a few bfloat16 units of the float32 run's."""
    _, _, out32 = run_quantize_layer(tiny_llama, QuantConfig(bits=8, group_size=32), replay=True)
    _, _, out16 = run_quantize_layer(tiny_llama, QuantConfig(bits=8, group_size=32, compute_dtype="bfloat16"), replay=True)
    for a, b in zip(out32, out16):
        assert a.dtype == b.dtype == torch.float32  # the residual stream stays float32
        assert (a - b).abs().max() <= 0.05 * a.abs().max()
        assert not torch.equal(a, b)  # bfloat16 really ran


def test_weights_held_in_the_forward_dtype_give_the_same_results(tiny_llama):
    """Weights whose values bfloat16 holds exactly are kept in it for bfloat16 forwards (no cast per call): the
    codes, scales and outputs equal those of keeping them float32 and letting autocast cast them."""
    model = copy.deepcopy(tiny_llama)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16).to(torch.float32)  # a bfloat16 checkpoint read as float32
    config = QuantConfig(bits=4, group_size=32, compute_dtype="bfloat16")
    results = {}
    for narrow in (True, False):
        copied = copy.deepcopy(model)
        layer, groups, inputs = layer_job(copied)
        seen = set()
        hooks = [linear.register_forward_pre_hook(lambda module, args: seen.add(module.weight.dtype)) for group in groups for _, linear in group]
        results[narrow] = quantize_layer(layer, groups, len(inputs), lambda i: run_layer(layer, inputs, i), config, torch.device("cpu"),
                                         output_projections=(("self_attn", "self_attn.o_proj"),), narrow_weights=narrow)
        for hook in hooks:
            hook.remove()
        assert seen == ({torch.bfloat16} if narrow else {torch.float32})
    (q_narrow, _, out_narrow), (q_wide, _, out_wide) = results[True], results[False]
    assert sorted(q_narrow) == sorted(q_wide) and len(q_wide) == 7
    for name in q_wide:
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(q_narrow[name], field), getattr(q_wide[name], field)), (name, field)
    for a, b in zip(out_narrow, out_wide):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_only_weights_the_forward_dtype_holds_exactly_are_narrowed_and_float32_after():
    from qtool.quant.forward_dtype import weights_in_forward_dtype

    exact, inexact = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False)
    exact.weight.data = torch.randn(4, 8).to(torch.bfloat16).float()
    inexact.weight.data = exact.weight.data.clone()
    inexact.weight.data[2, 3] += 1e-4  # below bfloat16's resolution at that value
    before = exact.weight.data.clone(), inexact.weight.data.clone()
    with pytest.raises(RuntimeError, match="stopped"):
        with weights_in_forward_dtype([exact, inexact], torch.bfloat16) as narrowed:
            assert narrowed == [exact]
            assert exact.weight.dtype == torch.bfloat16 and inexact.weight.dtype == torch.float32
            raise RuntimeError("stopped")  # e.g. out of memory: the redo starts from the weights as they came
    assert exact.weight.dtype == inexact.weight.dtype == torch.float32
    assert torch.equal(exact.weight.data, before[0]) and torch.equal(inexact.weight.data, before[1])
    with weights_in_forward_dtype([exact], torch.float32) as narrowed:
        assert narrowed == [] and exact.weight.dtype == torch.float32
