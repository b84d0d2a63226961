"""Default plans of the Triton GPTQ backend (kernels/default_plans.py): the rule gives one of the tuner's own
candidates for every width, group, dtype, odd shape and M bucket; on the Llama-2 shapes it gives the plans that
won the timing in bench/RESULTS.md; a backend that does not tune times nothing (stored plan, else the default, one
log line); a tuning backend stores what it times, and the next process's default backend serves it."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from gptq_reference import random_gptq_codes


from counting_tuner import CountingTuner
from qtool.kernels.default_plans import FAMILY_RULES, PACKED, gpu_family, rule_for, rules_for
from qtool.kernels.gptq_gemm_left_triton import LEFT_DENORMAL, LEFT_DEQUANT, LEFT_PACKED
from qtool.kernels.registry import BackendRegistry
from qtool.kernels.repack import repack_gptq
from qtool.kernels.triton_backend import (
    CUDA_GEMV_SHAPES,
    GEMV_ROWS_SHAPES,
    GEMV_SHAPES,
    LEFT_LARGE_SHAPES,
    LEFT_MID_SHAPES,
    LEFT_SKINNY_SHAPES,
    GpuFacts,
    Plan,
    TritonBackend,
    candidate_plans,
    default_plan,
    kernel_plan_store,
    tune_key,
)

H100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132)
A100 = GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 108)
BUCKETS = [1 << i for i in range(13)]  # 1 .. 4096


def layer(n, k, bits, group_size, act_order=False, asym=True, seed=0):
    codes = random_gptq_codes(n, k, bits, group_size, act_order, asym, "gptq_v2", seed=seed)
    return repack_gptq(codes.qweight, codes.qzeros, codes.scales, codes.g_idx, bits, "gptq_v2", codes.bias)


def shaped_like(weight, in_features, out_features):
    """`weight` as a layer of another size (what plans are chosen from: sizes, widths, groups, layout; the tensors
    are never read)."""
    return dataclasses.replace(weight, in_features=in_features, out_features=out_features, k_rows=in_features)


def test_every_pick_is_an_entry_of_the_tuners_tables():
    tables = {"gemv": set(GEMV_SHAPES + GEMV_ROWS_SHAPES),
              "left": set(LEFT_SKINNY_SHAPES + LEFT_MID_SHAPES + LEFT_LARGE_SHAPES), "dequant": {()},
              "cuda_gemv": set(CUDA_GEMV_SHAPES)}
    for rules in FAMILY_RULES.values():
        assert rules and rules[-1].min_values == 0 and rules[-1].min_out == 0 and not rules[-1].bits, \
            "the last rule must serve every layer of the largest buckets"
        for rule in rules:
            assert rule.measured, "each rule names the measurement it comes from"
            for pick in rule.picks:
                assert pick.shape in tables[pick.kind], pick


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_the_default_is_a_candidate_for_every_layer(bits, group_size):
    # N, K: odd tile counts, K not a multiple of 128; act order (a permutation, padded groups) on the second
    cases = [(96, 160, False, torch.bfloat16, H100), (4000, 1056, True, torch.float16, H100),
             (224, 416, False, torch.float16, A100)]
    for n, k, act_order, dtype, gpu in cases:
        weight = layer(n, k, bits, group_size, act_order, asym=not act_order, seed=n + k + bits)
        for m in BUCKETS:
            candidates = candidate_plans(weight, m, dtype, gpu.num_sms)
            plan = default_plan(weight, m, dtype, gpu, candidates)
            assert plan in candidates or (not candidates and plan == Plan("dequant")), \
                (n, k, act_order, dtype, gpu.name, m, plan.describe())
            assert plan == default_plan(weight, m, dtype, gpu), "the candidates passed in change nothing"


# (K, N, M) of bench/RESULTS.md's per-layer table (4-bit g128, bf16, H200) and the plan the tuner picked there
MEASURED = [
    (4096, 12288, 1, "gemv", dict(block_n=1024, units=2, split_k=43, prefetch=True)),  # 7B qkv, run 28
    (4096, 22016, 1, "gemv", dict(block_n=1024, units=2, split_k=24, prefetch=True)),  # 7B gate_up, run 28
    (8192, 57344, 1, "gemv", dict(block_n=1024, units=4, split_k=9, prefetch=False)),  # 70B gate_up, run 28
    (28672, 8192, 1, "gemv", dict(block_n=1024, units=4, split_k=64, prefetch=False)),  # 70B down, run 28
    (8192, 10240, 16, "left", dict(block_m=16, block_n=64, block_k=128, split_k=3, mode=LEFT_PACKED)),  # run 34
    (28672, 8192, 16, "left", dict(block_m=16, block_n=64, block_k=128, split_k=4, mode=LEFT_PACKED)),  # run 34
    (4096, 22016, 32, "left", dict(block_m=32, block_n=64, block_k=128, split_k=2, mode=LEFT_PACKED)),  # run 29
    (11008, 4096, 32, "left", dict(block_m=32, block_n=128, block_k=128, split_k=8, mode=LEFT_PACKED)),  # run 29
    (8192, 8192, 64, "left", dict(block_m=64, block_n=128, block_k=128, split_k=4, staged_words=True)),  # run 34
    (8192, 10240, 128, "left", dict(block_m=128, block_n=128, stream_programs=132, mode=LEFT_DENORMAL)),  # run 38
    (4096, 12288, 256, "left", dict(block_m=256, block_n=128, block_k=64, split_k=1, num_stages=4)),  # run 38
    (4096, 12288, 1024, "left", dict(block_m=256, block_n=128, block_k=64, split_k=1, num_stages=3)),  # run 36
    (8192, 8192, 1024, "dequant", {}),  # 70B o_proj, run 36
]


@pytest.mark.parametrize("k,n,m,kind,fields", MEASURED, ids=[f"{k}->{n} M={m}" for k, n, m, *_ in MEASURED])
def test_on_hopper_the_default_is_the_measured_winner(k, n, m, kind, fields):
    weight = shaped_like(layer(64, 256, 4, 128), k, n)
    assert weight.fragment_order
    plan = default_plan(weight, m, torch.bfloat16, H100)
    assert plan.kind == kind, plan.describe()
    assert {name: getattr(plan.config, name) for name in fields} == fields, plan.describe()


def test_the_natural_mode_follows_the_dtype_and_packed_needs_fragment_order():
    fragment = shaped_like(layer(64, 256, 4, 128), 4096, 4096)
    eight_bit = shaped_like(layer(64, 256, 8, 128), 4096, 4096)
    assert default_plan(fragment, 16, torch.float16, H100).config.mode == LEFT_PACKED
    assert default_plan(eight_bit, 16, torch.float16, H100).config.mode == LEFT_DEQUANT
    assert default_plan(eight_bit, 16, torch.bfloat16, H100).config.mode == LEFT_DENORMAL
    assert default_plan(fragment, 128, torch.float16, H100).config.mode == LEFT_DEQUANT


def test_a_family_without_measurements_gets_the_candidates_first_plan():
    weight = layer(224, 416, 4, 32)
    assert gpu_family(A100.capability) == "sm_80" and rules_for(A100.capability) == ()
    for m in BUCKETS:
        assert default_plan(weight, m, torch.bfloat16, A100) == candidate_plans(weight, m, torch.bfloat16, 108)[0]
    first_gemv = lambda rule: next(pick for pick in rule.picks if pick.kind == "gemv")  # noqa: E731
    assert first_gemv(rule_for(rules_for(H100.capability), 1, 57344, 8192, 4)).shape[1] == 32
    assert first_gemv(rule_for(rules_for(H100.capability), 1, 57344, 8192, 3)).shape[1] == 16  # measured at 4 bits only


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_the_triton_gemv_stays_the_hopper_default_where_the_cuda_gemv_built(bits):
    """The CUDA GEMV lost to the Triton GEMV on every Llama-2 shape measured on the H100: a tuner candidate only."""
    weight = layer(224, 416, bits, 32)
    with_cuda = default_plan(weight, 1, torch.bfloat16, H100, cuda_gemv=True)
    assert with_cuda == default_plan(weight, 1, torch.bfloat16, H100) and with_cuda.kind == "gemv"
    offered = candidate_plans(weight, 1, torch.bfloat16, H100.num_sms, cuda_gemv=True)
    assert with_cuda in offered and any(plan.kind == "cuda_gemv" for plan in offered) == (bits == 4)
    assert any(pick.mode == PACKED for pick in rule_for(rules_for(H100.capability), 16, 4096, 4096, 4).picks)


def decide(backend, weight, m, dtype=torch.bfloat16, gpu=H100):
    x = torch.randn(m, weight.in_features).to(dtype)
    return backend.decide_plan(tune_key(weight, m, dtype, torch.device("cuda", 0)), x, weight, gpu)


def test_a_backend_that_does_not_tune_times_nothing_and_says_so_once(tmp_path, caplog):
    weight = layer(224, 416, 4, 32)
    tuner = CountingTuner()
    backend = TritonBackend(tune=False, tuner=tuner, plan_store=kernel_plan_store(tmp_path))
    with caplog.at_level(logging.INFO, logger="qtool.kernels.triton_backend"):
        plans = {m: decide(backend, weight, m) for m in BUCKETS}
    assert not tuner.calls and not tuner.timings
    assert plans == {m: default_plan(weight, m, torch.bfloat16, H100) for m in BUCKETS}
    lines = [r.getMessage() for r in caplog.records if "default plans" in r.getMessage()]
    assert len(lines) == 1 and "qtool tune MODEL" in lines[0] and H100.name in lines[0], lines
    assert len(backend.default_keys) == len(BUCKETS)
    assert not list(tmp_path.iterdir()), "a default plan is not written to the cache"
    # the registry's backend, which every command gets, is one that does not tune
    assert BackendRegistry().get("triton").tune is False


def test_stored_plans_are_used_before_any_default(tmp_path, caplog):
    weight = layer(96, 160, 4, 32)
    store = kernel_plan_store(tmp_path)
    stored = {}
    for m in (1, 16, 256):
        candidates = candidate_plans(weight, m, torch.bfloat16, H100.num_sms)
        stored[m] = next(p for p in reversed(candidates) if p != default_plan(weight, m, torch.bfloat16, H100))
        store.put(H100.name, tune_key(weight, m, torch.bfloat16, torch.device("cuda", 0)), stored[m])
    tuner = CountingTuner()
    backend = TritonBackend(tune=False, tuner=tuner, plan_store=kernel_plan_store(tmp_path))  # a new process
    with caplog.at_level(logging.INFO, logger="qtool.kernels.triton_backend"):
        assert {m: decide(backend, weight, m) for m in stored} == stored
    assert not tuner.calls and not backend.default_keys
    assert not [r for r in caplog.records if "default plans" in r.getMessage()]
    # another GPU model has its own plans: the default serves there
    assert decide(backend, weight, 16, gpu=dataclasses.replace(H100, name="NVIDIA H200")) == \
        default_plan(weight, 16, torch.bfloat16, H100)


def test_a_tuning_backend_stores_what_it_timed_for_the_next_default_backend(tmp_path):
    weight = layer(96, 160, 4, 32)
    tuner = CountingTuner()
    tuning = TritonBackend(tune=True, tuner=tuner, plan_store=kernel_plan_store(tmp_path))
    tuned = {m: decide(tuning, weight, m) for m in (1, 8, 64)}
    assert len(tuner.calls) == 3
    assert decide(tuning, weight, 5) == tuned[8] and len(tuner.calls) == 3  # M = 5 is bucket 8: decided already
    serving_tuner = CountingTuner()
    serving = TritonBackend(tune=False, tuner=serving_tuner, plan_store=kernel_plan_store(tmp_path))
    assert {m: decide(serving, weight, m) for m in tuned} == tuned
    # a plan tuned at the bucket's M serves every M of the bucket in the next process too
    assert decide(serving, weight, 33) == tuned[64]
    assert not serving_tuner.calls and not serving.default_keys


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the default plans; needs CUDA")
@pytest.mark.parametrize("bits,group_size,act_order,dtype", [
    (4, 128, False, torch.bfloat16), (4, 32, True, torch.float16), (3, 128, False, torch.bfloat16),
    (8, -1, False, torch.float16), (2, 64, False, torch.bfloat16),
])
def test_every_default_plan_computes_the_right_result_on_gpu(bits, group_size, act_order, dtype):
    """What a user gets without tuning, compiled on this GPU, against float64 (two calls: split-K leaves its
    workspace clean)."""
    from gptq_reference import reference, relative_error

    from qtool.kernels.linear_tensors import GptqLinearTensors

    gpu = GpuFacts.of(torch.device("cuda"))
    codes = random_gptq_codes(768, 1024, bits, group_size, act_order, True, "gptq_v2", seed=bits)
    tensors = GptqLinearTensors(*(t.cuda() for t in (codes.qweight, codes.qzeros, codes.scales, codes.g_idx,
                                                     codes.bias)), bits, group_size, "gptq_v2")
    backend = TritonBackend(tune=False)
    weight = backend.prepare(tensors)
    failures = []
    for m in (1, 2, 3, 8, 16, 32, 64, 100, 256, 1024):
        x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
        expected = reference(x, codes.codes, codes.scales, codes.zeros, codes.g_idx, codes.bias)
        plan = default_plan(weight, m, dtype, gpu)
        for attempt in range(2):
            error = relative_error(backend.run_plan(plan, x, weight), expected)
            if not error < (1e-2 if dtype == torch.bfloat16 else 2e-3):
                failures.append(f"M={m} call {attempt}: {plan.describe()}: relative error {error:.2e}")
    assert not failures, "\n".join(failures)
