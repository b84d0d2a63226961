"""The on-disk cache of tuned kernel plans (kernels/plan_store.py) and how the Triton backend uses it: plans of
every kind survive a new process, a changed kernel or library version starts a new file, a plan that is no longer
a candidate is re-tuned, and a broken or unwritable cache costs one warning, never an error."""

import json
import logging

import pytest
import torch
from gptq_reference import random_gptq_codes
from kernel_env import DEVICE

from qtool.kernels.gptq_gemm_left_triton import LEFT_PACKED, LeftGemmConfig
from qtool.kernels.gptq_gemm_triton import GemmConfig
from qtool.kernels.gptq_gemv_triton import GemvConfig
from qtool.kernels.plan_store import PlanStore, kernel_fingerprint
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.registry import BackendRegistry
from qtool.kernels.repack import repack_gptq
from qtool.kernels.triton_backend import (
    PLAN_TYPES,
    Plan,
    TritonBackend,
    candidate_plans,
    default_triton_backend,
    kernel_plan_store,
    stored_plan,
    tune_key,
)

H200 = "NVIDIA H200"


def layer(n=96, k=256, bits=4, group_size=128):
    codes = random_gptq_codes(n, k, bits, group_size, False, True, "gptq_v2", seed=n + k)
    return repack_gptq(codes.qweight, codes.qzeros, codes.scales, codes.g_idx, bits, "gptq_v2", codes.bias)


def store_in(directory, fingerprint="f" * 64):
    return PlanStore(directory, fingerprint, PLAN_TYPES, Plan)


PLANS = [
    Plan("gemv", GemvConfig(block_n=512, units=4, split_k=8, num_warps=4, prefetch=True)),
    Plan("gemm", GemmConfig(16, 32, 64, split_k=2)),
    Plan("left", LeftGemmConfig(64, 128, 128, split_k=4, mode=LEFT_PACKED, num_warps=8, staged_words=True,
                                scale_ahead=True)),
    Plan("dequant"),
]


def test_every_plan_kind_survives_a_new_store(tmp_path):
    weight = layer()
    keys = [tune_key(weight, m, torch.bfloat16, torch.device("cuda", 1)) for m in (1, 16, 64, 256)]
    first = store_in(tmp_path)
    for key, plan in zip(keys, PLANS):
        first.put(H200, key, plan)
    again = store_in(tmp_path)  # as a new process would
    assert [again.get(H200, key) for key in keys] == PLANS
    # the GPU model counts, not which index it had in the process that tuned it
    assert again.get(H200, tune_key(weight, 16, torch.bfloat16, torch.device("cuda", 0))) == PLANS[1]
    assert again.get("NVIDIA A100-SXM4-80GB", keys[0]) is None
    assert again.get(H200, tune_key(weight, 16, torch.float16, torch.device("cuda", 0))) is None
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was left behind"


def test_a_stored_plan_is_used_only_while_it_is_a_candidate(tmp_path):
    weight = layer()
    key = tune_key(weight, 16, torch.bfloat16, torch.device("cuda", 0))
    candidates = candidate_plans(weight, 16, torch.bfloat16, num_sms=132)
    chosen = candidates[len(candidates) // 2]
    store_in(tmp_path).put(H200, key, chosen)
    assert stored_plan(store_in(tmp_path), H200, key, candidates) == chosen
    others = [plan for plan in candidates if plan != chosen]
    assert stored_plan(store_in(tmp_path), H200, key, others) is None  # the candidate set changed: re-tune
    assert stored_plan(None, H200, key, candidates) is None


def test_another_fingerprint_is_another_file(tmp_path):
    key = tune_key(layer(), 1, torch.bfloat16, torch.device("cuda", 0))
    store_in(tmp_path, "a" * 64).put(H200, key, PLANS[0])
    assert store_in(tmp_path, "b" * 64).get(H200, key) is None
    assert store_in(tmp_path, "a" * 64).get(H200, key) == PLANS[0]


def test_fingerprint_follows_kernel_sources_and_versions(tmp_path):
    sources = [tmp_path / name for name in ("b_triton.py", "a_common.py")]
    for i, path in enumerate(sources):
        path.write_text(f"KERNEL = {i}\n")
    versions = {"triton": "3.6.0", "torch": "2.11.0"}
    base = kernel_fingerprint(sources, versions)
    assert kernel_fingerprint(list(reversed(sources)), versions) == base
    assert kernel_fingerprint(sources, {**versions, "triton": "3.5.1"}) != base
    sources[1].write_text("KERNEL = 1  # edited\n")
    assert kernel_fingerprint(sources, versions) != base
    # the package's own store: its file name carries the fingerprint of the installed kernels
    store = kernel_plan_store(tmp_path)
    assert store.fingerprint[:24] in store.path.name and kernel_plan_store(tmp_path).path == store.path
    assert kernel_plan_store(None) is None


def test_writers_merge_instead_of_overwriting(tmp_path):
    weight = layer()
    one, two = (tune_key(weight, m, torch.bfloat16, torch.device("cuda", 0)) for m in (1, 2))
    first, second = store_in(tmp_path), store_in(tmp_path)
    first.get(H200, one)  # both have read the (empty) file before either writes
    second.get(H200, one)
    first.put(H200, one, PLANS[0])
    second.put(H200, two, PLANS[2])
    fresh = store_in(tmp_path)
    assert fresh.get(H200, one) == PLANS[0] and fresh.get(H200, two) == PLANS[2]


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', '{"format": 99, "fingerprint": "x", "plans": []}',
                                     '{"format": 1, "fingerprint": "FINGERPRINT", "plans": [{"key": 1}]}'])
def test_a_broken_cache_file_is_ignored_with_one_warning_and_rewritten(tmp_path, caplog, content):
    store = store_in(tmp_path)
    store.path.write_text(content.replace("FINGERPRINT", store.fingerprint))
    weight = layer()
    keys = [tune_key(weight, m, torch.bfloat16, torch.device("cuda", 0)) for m in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="qtool.kernels.plan_store"):
        assert store.get(H200, keys[0]) is None and store.get(H200, keys[1]) is None
        store.put(H200, keys[0], PLANS[1])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(store.path) in warnings[0].getMessage()
    assert store_in(tmp_path).get(H200, keys[0]) == PLANS[1]


def test_entries_from_other_code_are_skipped(tmp_path):
    store = store_in(tmp_path)
    key = tune_key(layer(), 16, torch.bfloat16, torch.device("cuda", 0))
    store.put(H200, key, PLANS[2])
    body = json.loads(store.path.read_text())
    body["plans"][0]["config"]["warp_specialize"] = True  # a field this code does not know
    store.path.write_text(json.dumps(body))
    assert store_in(tmp_path).get(H200, key) is None
    body["plans"][0].update(kind="marlin", config={})
    store.path.write_text(json.dumps(body))
    assert store_in(tmp_path).get(H200, key) is None


def test_an_unwritable_cache_warns_once_and_keeps_serving(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = store_in(blocker / "tuning")
    weight = layer()
    keys = [tune_key(weight, m, torch.bfloat16, torch.device("cuda", 0)) for m in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="qtool.kernels.plan_store"):
        store.put(H200, keys[0], PLANS[0])
        store.put(H200, keys[1], PLANS[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "QTOOL_CACHE_DIR" in warnings[0]
    assert store.get(H200, keys[1]) == PLANS[1]  # this process still has it


def test_the_registry_backend_keeps_plans_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path / "cache"))
    backend = BackendRegistry().get("triton")  # what --backend triton/auto gets
    assert isinstance(backend, TritonBackend) and backend.plan_store.path.parent == tmp_path / "cache" / "tuning"
    assert not (tmp_path / "cache").exists(), "nothing is written before a plan is tuned"
    monkeypatch.setenv("QTOOL_CACHE_DIR", "off")
    assert default_triton_backend().plan_store is None
    assert TritonBackend().plan_store is None  # built directly (tests, benchmarks): tunes afresh


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tunes on the GPU")
def test_a_second_backend_reuses_the_first_ones_plan_without_timing(tmp_path):
    codes = random_gptq_codes(768, 1024, 4, 128, False, True, "gptq_v2", seed=5)
    tensors = GptqLinearTensors(codes.qweight.to(DEVICE), codes.qzeros.to(DEVICE), codes.scales.to(DEVICE),
                                codes.g_idx.to(DEVICE), codes.bias.to(DEVICE), 4, 128, "gptq_v2")
    x = torch.randn(16, 1024, device=DEVICE, dtype=torch.bfloat16)
    first = TritonBackend(tune=True, plan_store=kernel_plan_store(tmp_path))
    y = first.matmul(x, first.prepare(tensors))
    assert first.tuner.timings, "the first backend tuned"
    second = TritonBackend(tune=False, plan_store=kernel_plan_store(tmp_path))
    y_again = second.matmul(x, second.prepare(tensors))
    assert not second.tuner.timings and second.plans == first.plans and not second.default_keys
    # the same plan, but not always the same bits: split-K partial sums meet in float32 atomics in whatever order the
    # programs finish, which moved bfloat16 outputs by one or two units in the last place on the H200 (run 44)
    torch.testing.assert_close(y_again, y, rtol=2 ** -6, atol=1e-3 * y.abs().max().item())
