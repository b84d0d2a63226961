"""The decode step's CUDA graphs on the device (gpu): replay equal to the eager step (padded rows included), greedy
output with graphs on equal to graphs off and to the module path, float and q4 caches (q4: rows that fill a block
and start one, the host's quantization around the replay), a q8 cache's kernels inside the graphs, a prefix hit's new tokens replayed as
decode rows equal to the prefill path, and no kernel tuning inside the first request after start-up (every token-count and batch
bucket is warmed up when the engine starts)."""

from __future__ import annotations

import pytest
import torch

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.decode_step import DecodeRows
from qtool.runtime.engine.q4_decode import finish_q4_decode, plan_q4_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")]

PROMPTS = [[1, 5, 9], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57],
           [1, 77, 78, 79, 80, 81, 82], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68]]
# a llama big enough for every Triton kernel's tiles (head_dim 64, widths multiples of 128)
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def engine_on_gpu(model, **settings) -> Engine:
    config = dict(block_size=16, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    config.update(settings)
    return Engine(model, None, EngineConfig(**config))


def test_graph_replay_equals_the_eager_step(make_tiny_llama):
    model = make_tiny_llama(**SHAPE).to("cuda")
    engine = engine_on_gpu(model)
    graphs = engine.runner.decode_graphs
    # max_num_seqs 8, and up to a short chunk's 64 rows (a prefix hit's new tokens run as decode rows)
    assert graphs is not None and set(graphs.graphs) == {1, 2, 4, 8, 16, 32, 64}, "every bucket captured"
    for prompt in PROMPTS + [[1, 2, 3, 4, 5]]:
        engine.add_request(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()  # the prefills
    chunks = engine.scheduler.schedule()
    cache = engine.runner.cache
    saved = cache.key.clone(), cache.value.clone()
    for count in range(1, len(chunks) + 1):  # 5 rows replay the graph of 8: three padded rows
        rows = DecodeRows.from_chunks(chunks[:count], cache.block_size)
        with torch.inference_mode():
            replayed = graphs.run(rows)
            replayed_cache = cache.key.clone(), cache.value.clone()
            cache.key.copy_(saved[0]), cache.value.copy_(saved[1])
            eager = engine.runner.decode_step(rows.to_inputs(engine.runner.device))
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(replayed_cache[0], cache.key, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(replayed_cache[1], cache.value, rtol=1e-5, atol=1e-5)
        cache.key.copy_(saved[0]), cache.value.copy_(saved[1])


def test_greedy_with_graphs_on_equals_graphs_off_and_the_module_path(make_tiny_llama):
    model = make_tiny_llama(**SHAPE).to("cuda")  # float32: no rounding between the paths to flip a near tie
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 9, 17, 30)]
    outputs = {}
    for name, settings in {"graphs": {}, "eager": dict(cuda_graphs=False),
                           "modules": dict(fast_decode=False)}.items():
        engine = engine_on_gpu(model, **settings)
        outputs[name] = [out.token_ids for out in engine.generate(PROMPTS, params)]
        assert (engine.runner.decode_graphs is not None) == (name == "graphs")
        assert (engine.runner.fast_decode_steps > 0) == (name != "modules")
    assert outputs["graphs"] == outputs["eager"] == outputs["modules"]


def test_short_chunks_replay_the_decode_graphs_and_equal_the_prefill_path(make_tiny_llama):
    model = make_tiny_llama(**SHAPE).to("cuda")  # float32
    shared = [1] + list(range(100, 131))  # two full blocks of 16: cached after the first request
    # 80: over the 64-token cap, the prefill path
    prompts = [shared + list(range(200, 200 + n)) for n in (5, 1, 17, 64, 80)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outputs = {}
    for rows in (0, None):  # None: the CUDA default, SHORT_PREFILL_ROWS
        engine = engine_on_gpu(model, short_prefill_rows=rows, max_num_batched_tokens=128)
        outputs[rows] = [engine.generate(prompt, params)[0].token_ids for prompt in prompts]  # one at a time
        assert engine.stats().prefix_hit_requests == len(prompts) - 1
        assert (engine.runner.short_prefill_steps > 0) == (rows is None)
    assert outputs[None] == outputs[0]


def test_q8_greedy_with_graphs_equals_the_module_path(make_tiny_llama):
    """The q8 cache's write and attention kernels inside the captured step: greedy tokens equal the eager step's
    and the module path's over the same q8 cache (float32 model)."""
    model = make_tiny_llama(**SHAPE).to("cuda")
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 9, 17, 30)]
    outputs = {}
    for name, settings in {"graphs": {}, "eager": dict(cuda_graphs=False),
                           "modules": dict(fast_decode=False)}.items():
        engine = engine_on_gpu(model, kv_cache="q8", **settings)
        outputs[name] = [out.token_ids for out in engine.generate(PROMPTS, params)]
        assert (engine.runner.decode_graphs is not None) == (name == "graphs"), engine.runner.decode_step_reason
    assert outputs["graphs"] == outputs["eager"] == outputs["modules"]


def test_no_kernel_tuning_inside_the_first_request(make_tiny_llama):
    from qtool.kernels.quant_linear import QuantLinear, set_model_backend
    from qtool.kernels.registry import BackendRegistry
    from qtool.kernels.triton_backend import TritonBackend
    from qtool.quant.rtn import rtn_quantize

    model = make_tiny_llama(**SHAPE).to("cuda", torch.float16)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, attribute = name.rpartition(".")
            quantized = QuantLinear.from_quantized(rtn_quantize(module.weight.data.float(), 4, 128).quantized)
            setattr(model.model.layers.get_submodule(parent), attribute, quantized.to("cuda"))
    backend = TritonBackend()  # tunes afresh: no plan store
    registry = BackendRegistry({"triton": lambda: backend, "torch": "qtool.kernels.torch_backends:GptqTorchBackend"})
    set_model_backend(model, "triton", registry)
    assert not backend.tuner.plans
    engine = engine_on_gpu(model)
    tuned = dict(backend.tuner.plans)
    assert tuned, "the engine's start tuned the linears"
    timings = len(backend.tuner.timings)
    # prompts of every length class the step budget brings (whole, chunked) and 1..4 running decodes
    prompts = [[1] + list(range(10, 10 + n)) for n in (2, 37, 90, 15)]
    engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert backend.tuner.plans == tuned and len(backend.tuner.timings) == timings, "no tuning in the request"


# block size 16: after the prefills, the 15-token prompt's first decode fills block 0 and the 16-token one's starts
# block 1
Q4_PROMPTS = [[1, 5, 9], list(range(1, 16)), list(range(100, 116)), [1, 60, 61, 62, 63, 64, 65, 66, 67, 68],
              [1, 2, 3, 4, 5]]
Q4_TENSORS = ("key_codes", "key_scales", "value_codes", "value_scales", "key_staging", "value_staging")


def q4_state(cache) -> tuple[dict, list]:
    return {name: getattr(cache, name).clone() for name in Q4_TENSORS}, [table.copy() for table in cache.tables]


def q4_restore(cache, state) -> None:
    tensors, tables = state
    for name, saved in tensors.items():
        getattr(cache, name).copy_(saved)
    for table, saved_table in zip(cache.tables, tables):
        table.assign(saved_table)


def test_q4_graph_replay_equals_the_eager_step(make_tiny_llama):
    model = make_tiny_llama(**SHAPE).to("cuda")
    engine = engine_on_gpu(model, kv_cache="q4")
    runner, cache = engine.runner, engine.runner.cache
    assert runner.decode_step is not None and runner.decode_step.is_q4, runner.decode_step_reason
    graphs = runner.decode_graphs
    # max_num_seqs 8 (a q4 cache runs no short chunks as decode rows)
    assert graphs is not None and set(graphs.graphs) == {1, 2, 4, 8}, "every bucket captured"
    for prompt in Q4_PROMPTS:
        engine.add_request(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()  # the prefills
    chunks = engine.scheduler.schedule()
    offsets = [chunk.start % cache.block_size for chunk in chunks]
    assert 15 in offsets and 0 in offsets, offsets
    saved = q4_state(cache)
    for count in range(1, len(chunks) + 1):  # 3, 5 rows replay the graphs of 4, 8: padded rows
        rows = DecodeRows.from_chunks(chunks[:count], cache.block_size)
        with torch.inference_mode():
            plan = plan_q4_decode(cache, rows.slots)
            assert plan is not None
            rows.own_slots = plan.staging_slots
            replayed = graphs.run(rows)
            finish_q4_decode(cache, plan)
            after_replay = q4_state(cache)
            q4_restore(cache, saved)
            plan = plan_q4_decode(cache, rows.slots)
            eager = runner.decode_step(rows.to_inputs(runner.device))
            finish_q4_decode(cache, plan)
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        for name, tensor in after_replay[0].items():  # the same kernels on the same inputs
            assert torch.equal(tensor, getattr(cache, name)), name
        assert [vars(t) for t in after_replay[1]] == [vars(t) for t in cache.tables]
        q4_restore(cache, saved)


def test_q4_greedy_with_graphs_on_equals_graphs_off_and_the_module_path(make_tiny_llama):
    model = make_tiny_llama(**SHAPE).to("cuda")  # float32: no rounding between the paths to flip a near tie
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (40, 9, 23, 30, 35)]
    outputs = {}
    for name, settings in {"graphs": {}, "eager": dict(cuda_graphs=False),
                           "modules": dict(fast_decode=False)}.items():
        engine = engine_on_gpu(model, kv_cache="q4", **settings)
        outputs[name] = [out.token_ids for out in engine.generate(Q4_PROMPTS, params)]
        assert (engine.runner.decode_graphs is not None) == (name == "graphs")
        assert (engine.runner.fast_decode_steps > 0) == (name != "modules")
    assert outputs["graphs"] == outputs["eager"] == outputs["modules"]
