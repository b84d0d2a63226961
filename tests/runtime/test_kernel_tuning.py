"""`qtool tune`'s library (runtime/kernel_tuning.py) on a tiny GPTQ llama, with the tuner's timing replaced in this
test (no GPU here): every distinct layer shape goes through the tuner once per M bucket, the plans land in the cache
and a second run finds them there; a model without GPTQ linears, a float32 run and a disabled cache are refused."""

from __future__ import annotations


import pytest
import torch


from counting_tuner import CountingTuner
from qtool.core.errors import QtoolError
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.triton_backend import GpuFacts, TritonBackend, kernel_plan_store
from qtool.runtime.kernel_tuning import fuse_engine_projections, m_buckets, tune_layers

H100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132)
CUDA = torch.device("cuda", 0)  # what the keys name; nothing runs on it


def gptq_llama(model, bits=4, group_size=32):
    """The tiny llama with every decoder linear a QuantLinear holding its RTN-quantized weight."""
    from qtool.quant.rtn import rtn_quantize

    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            quantized = rtn_quantize(module.weight.data, bits, group_size).quantized
            parent, _, attribute = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), attribute, QuantLinear.from_quantized(quantized))
    return model


def test_every_distinct_layer_is_tuned_once_per_bucket_and_stored(tiny_llama, tmp_path):
    model = gptq_llama(tiny_llama)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    distinct = {(m.in_features, m.out_features) for m in linears}
    tuner = CountingTuner()
    backend = TritonBackend(tune=True, tuner=tuner, plan_store=kernel_plan_store(tmp_path))
    result = tune_layers(model, [1, 3, 64, 50], backend, H100, torch.bfloat16, CUDA)
    assert result.batch_sizes == [1, 4, 64]
    assert result.layers == len(linears) and result.shapes == len(distinct) > 1
    assert len(tuner.calls) == len(set(tuner.calls)) == len(distinct) * 3
    assert result.tuned == len(tuner.calls) and result.stored_before == 0
    assert {(p.in_features, p.out_features) for p in result.plans} == distinct
    assert result.plan_cache == str(backend.plan_store.path) and backend.plan_store.path.exists()
    fresh = kernel_plan_store(tmp_path)  # as the next process reads it
    for key in tuner.calls:
        assert fresh.get(H100.name, key) == tuner.plans[key]
    # a second run: everything stored, nothing timed
    again_tuner = CountingTuner()
    again = tune_layers(model, [1, 4, 64], TritonBackend(tune=True, tuner=again_tuner,
                                                         plan_store=kernel_plan_store(tmp_path)),
                        H100, torch.bfloat16, CUDA)
    assert not again_tuner.calls and again.stored_before == result.tuned and again.tuned == 0
    assert [p.plan for p in again.plans] == [p.plan for p in result.plans]
    # the progress callback counts every (shape, bucket) and ends at the total
    seen = []
    tune_layers(model, [1], TritonBackend(tune=True, tuner=CountingTuner(), plan_store=kernel_plan_store(tmp_path)),
                H100, torch.bfloat16, CUDA, progress=lambda done, total, detail: seen.append((done, total)))
    assert seen[-1] == (len(distinct), len(distinct)) and [d for d, _ in seen] == list(range(len(distinct) + 1))


def test_refusals(tiny_llama, make_tiny_llama, tmp_path):
    backend = TritonBackend(tune=True, tuner=CountingTuner(), plan_store=kernel_plan_store(tmp_path))
    with pytest.raises(QtoolError, match="no GPTQ quantized linears"):
        tune_layers(make_tiny_llama(), [1], backend, H100, torch.bfloat16, CUDA)
    model = gptq_llama(tiny_llama)
    with pytest.raises(QtoolError, match="float16 or bfloat16"):
        tune_layers(model, [1], backend, H100, torch.float32, CUDA)
    with pytest.raises(QtoolError, match="QTOOL_CACHE_DIR=off"):
        tune_layers(model, [1], TritonBackend(tune=True, tuner=CountingTuner()), H100, torch.bfloat16, CUDA)
    for sizes in ([], [0], [2, -1]):
        with pytest.raises(QtoolError, match="batch sizes"):
            m_buckets(sizes)
    assert not backend.tuner.calls


def test_an_unwritable_cache_is_an_error_not_a_silent_loss(tiny_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    backend = TritonBackend(tune=True, tuner=CountingTuner(), plan_store=kernel_plan_store(blocker / "tuning"))
    with pytest.raises(QtoolError, match="could not write"):
        tune_layers(gptq_llama(tiny_llama), [1], backend, H100, torch.bfloat16, CUDA)


def test_the_engines_fused_projections_are_tuned_beside_the_models_own_linears(tiny_llama, tmp_path):
    model = gptq_llama(tiny_llama)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    own = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, QuantLinear)}
    fused = fuse_engine_projections(model)
    assert len(fused) == 2 * config.num_hidden_layers  # q/k/v and gate/up in every layer
    qkv_width = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    fused_shapes = {(config.hidden_size, qkv_width), (config.hidden_size, 2 * config.intermediate_size)}
    assert {(m.in_features, m.out_features) for m in fused} == fused_shapes
    tuner = CountingTuner()
    backend = TritonBackend(tune=True, tuner=tuner, plan_store=kernel_plan_store(tmp_path))
    result = tune_layers(model, [1], backend, H100, torch.bfloat16, CUDA, extra=fused)
    assert {(p.in_features, p.out_features) for p in result.plans} == own | fused_shapes
    assert result.layers == sum(isinstance(m, QuantLinear) for m in model.modules())  # the model's own count
    assert len(tuner.calls) == len(own | fused_shapes)
