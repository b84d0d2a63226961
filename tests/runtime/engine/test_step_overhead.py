"""The engine's per-step host work, cut down without changing what it computes: prefill and mixed steps through the
decode step's fused ops (DecodeStep.ragged) equal the module path in logits and cache writes; the one-copy sampler
(sample_finite) draws what sample() draws and refuses non-finite logits; decode inputs built in two copies equal the
rows; StepPhases counts every step once, by kind, without double counting; and the profile script runs."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench_scripts import load_bench_script
from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.decode_step import DecodeRows
from qtool.runtime.engine.sampling import request_generator, sample, sample_finite
from qtool.runtime.engine.step_phases import PHASES, StepPhases

# ragged prompts spanning several blocks of 4, longer than the tiny models' sliding windows (4)
PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 77, 78]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _cache(runner) -> tuple[torch.Tensor, torch.Tensor]:
    return runner.cache.key.clone(), runner.cache.value.clone()


def _mixed_step_equals_the_module_path(model, **config) -> None:
    engine = Engine(model, None, EngineConfig(fast_decode=True, fast_prefill=True, **config))
    runner = engine.runner
    assert runner.fast_prefill, runner.decode_step_reason
    for prompt in PROMPTS[:2]:
        engine.add_request(prompt, GREEDY)
    for _ in range(3):  # chunked prefills (a budget of 9 tokens), then decodes
        engine.step()
    engine.add_request(PROMPTS[2], GREEDY)
    chunks = engine.scheduler.schedule()
    assert any(c.num_tokens == 1 for c in chunks) and any(c.num_tokens > 1 for c in chunks), "a mixed step"
    before = _cache(runner)
    expected = runner.execute_modules(chunks)
    expected_cache = _cache(runner)
    runner.cache.key.copy_(before[0])
    runner.cache.value.copy_(before[1])
    steps = runner.fast_prefill_steps
    got = runner.execute(chunks)
    assert runner.fast_prefill_steps == steps + 1, "execute took the fused ops"
    assert got.shape == expected.shape == (sum(c.num_logits for c in chunks), model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner.cache.key, expected_cache[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.cache.value, expected_cache[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "granite"])
def test_a_mixed_step_through_the_fused_ops_equals_the_module_path(family, build_family):
    extra = {"granite": dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.5)}
    model = build_family(family, seed=11, **extra.get(family, {}))
    _mixed_step_equals_the_module_path(model, block_size=4, num_blocks=64, max_num_batched_tokens=9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton engine ops and flash prefill run on CUDA")
def test_a_mixed_step_on_the_gpu_through_the_fused_ops_equals_the_module_path(make_tiny_llama):
    # float32, and a llama big enough for every Triton kernel's tiles (head_dim 64, widths multiples of 128)
    model = make_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=64).to("cuda")
    _mixed_step_equals_the_module_path(model, block_size=16, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=9)


def test_fast_prefill_off_keeps_the_modules_and_the_same_greedy_output(build_family):
    model = build_family("llama", seed=4)
    outputs = {}
    for fast_prefill in (True, False):
        engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=7,
                                                  fast_decode=True, fast_prefill=fast_prefill))
        outputs[fast_prefill] = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        assert (engine.runner.fast_prefill_steps > 0) == fast_prefill
    assert outputs[True] == outputs[False]


def test_sample_finite_draws_what_sample_draws_and_refuses_non_finite_logits():
    rng = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 37, generator=rng) * 3
    params = [SamplingParams(temperature=0), SamplingParams(seed=1, top_k=4), SamplingParams(seed=2, top_p=0.8),
              SamplingParams(temperature=0, repetition_penalty=1.7), SamplingParams(seed=3, min_p=0.1,
                                                                                    repetition_penalty=0.6)]
    contexts = [[], [], [], [int(logits[3].argmax()), 2], [int(logits[4].argmax())]]
    drawn = [sample(logits, params, contexts, [request_generator(p.seed) for p in params]) for _ in range(2)]
    again = sample_finite(logits, params, contexts, [request_generator(p.seed) for p in params])
    assert again == drawn[0] == drawn[1]
    assert again[0] == int(logits[0].argmax())
    assert again[3] != int(logits[3].argmax()), "the penalty moved the greedy choice"
    assert sample_finite(logits[:0], [], [], []) == []
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[2, 7] = bad
        assert sample_finite(broken, params, contexts, [request_generator(p.seed) for p in params]) is None


def test_the_engine_refuses_non_finite_logits_naming_the_model(make_tiny_llama):
    model = make_tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=16))
    with pytest.raises(QtoolError, match="hold NaN or infinite values"):
        engine.generate([[1, 2, 3]], GREEDY)


def test_decode_inputs_in_two_copies_equal_the_rows():
    rng = torch.Generator().manual_seed(2)
    tables = [torch.randint(0, 50, (n,), generator=rng).tolist() for n in (3, 1, 5)]
    rows = DecodeRows([7, 8, 9], [10, 0, 17], [41, 3, 77], tables)
    inputs = rows.to_inputs(torch.device("cpu"), width=6)
    assert inputs.input_ids.tolist() == [7, 8, 9] and inputs.input_ids.dtype == torch.long
    assert inputs.positions.tolist() == [10, 0, 17]
    assert inputs.slots.tolist() == [41, 3, 77] and inputs.slots.dtype == torch.long
    assert inputs.context_lens.tolist() == [11, 1, 18] and inputs.context_lens.dtype == torch.int32
    assert inputs.block_tables.dtype == torch.int32
    assert inputs.block_tables.tolist() == [table + [0] * (6 - len(table)) for table in tables]
    assert rows.to_inputs(torch.device("cpu")).block_tables.shape == (3, 5)


@pytest.mark.parametrize("fast_decode", [True, False])
def test_step_phases_count_every_step_once_by_kind(fast_decode, make_tiny_llama):
    engine = Engine(make_tiny_llama(seed=2), None, EngineConfig(block_size=4, num_blocks=32, fast_decode=fast_decode))
    phases = StepPhases()
    engine.record_phases(phases)
    began = time.perf_counter_ns()
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    wall = time.perf_counter_ns() - began
    assert phases.steps("other") == 1 and phases.steps("decode") == 5  # the prefill, then one token per step
    recorded = sum(sum(ns) for kind in phases.ns.values() for ns in kind.values())
    assert 0 < recorded <= wall, "phases cover the steps, never more than their time"
    assert all(len(ns) == phases.steps(kind) for kind, by_phase in phases.ns.items() for ns in by_phase.values())
    assert set(phases.per_step_us()) == {*PHASES, "total"}
    assert all(phases.ns["decode"][phase] for phase in ("schedule", "prepare", "forward", "sample")), \
        "every phase marked"
    engine.record_phases(None)
    engine.generate([PROMPTS[2]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert phases.steps("decode") == 5, "no recording once detached"
    with pytest.raises(ValueError, match="clock"):
        StepPhases(clock="sundial")


def test_the_engine_overhead_script_reports_each_path(tmp_path):
    script = load_bench_script("runtime/engine_overhead")
    out = tmp_path / "overhead.jsonl"
    assert script.main(["--tiny", "--new-tokens", "5", "--out", str(out)]) == 0
    results = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"decode-step", "modules"}
    for path, result in results.items():
        assert result["decode_steps"] == 2 * 4 and result["other_steps"] == 2, path  # 2 timed requests of 5 tokens
        assert result["decode_us_per_step"]["total"] > 0
        assert result["first_request_ttft_ms"] > 0
    assert results["decode-step"]["fast_decode_steps"] > 0 and results["modules"]["fast_decode_steps"] == 0
