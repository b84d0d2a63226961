"""The CUDA GEMV (4-bit, M = 1..4) against y = x @ W^T + b in float64 from codes packed by an independent packer,
on the GPU (skipped elsewhere); and, everywhere, what the backend does around it: its plans are candidates only
where the extension built, and a machine without CUDA or a compiler gets a reason, not an error."""


import pytest
import torch
from gptq_reference import random_gptq_codes, reference, relative_error
from kernel_env import DEVICE


from qtool.kernels.gptq_gemv_cuda import (
    BLOCK_ROWS,
    SHARED_LIMIT,
    CudaGemvConfig,
    blocks_per_split,
    cuda_gemv_problem,
    gptq_gemv_cuda,
    load_cuda_gemv,
    split_launch,
)
from qtool.kernels.repack import repack_gptq
from qtool.kernels.triton_backend import PLAN_TYPES, Plan, TritonBackend, candidate_plans
from qtool.kernels.linear_tensors import GptqLinearTensors

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA GEMV runs on a CUDA device")


@pytest.fixture(scope="module")
def built():
    gemv = load_cuda_gemv(torch.device("cuda"))
    assert gemv.module is not None, f"the CUDA GEMV did not build: {gemv.problem}"
    return gemv


def gptq_layer(n, k, group_size, act_order, asym, fmt, seed, irregular=False, fragment=True, scale_dtype=torch.float16):
    layer = random_gptq_codes(n, k, 4, group_size, act_order, asym, fmt, seed, irregular)
    scales = layer.scales.to(scale_dtype)
    weight = repack_gptq(layer.qweight.to(DEVICE), layer.qzeros.to(DEVICE), scales.to(DEVICE), layer.g_idx.to(DEVICE), 4,
                         fmt, fragment_order=fragment)
    return layer, scales, weight


# (n, k, group size, act order, asym, format, irregular groups, fragment order, x dtype, scale dtype, split_k, warps_k)
CASES = [
    (96, 160, 32, True, True, "gptq", False, True, torch.float16, torch.float16, 3, 4),
    (136, 256, 64, False, False, "gptq", False, True, torch.bfloat16, torch.float16, 2, 8),  # N not a multiple of 128
    (128, 200, -1, False, True, "gptq_v2", False, False, torch.float16, torch.float16, 4, 2),  # K % 32 != 0
    (64, 96, 48, True, True, "gptq", False, True, torch.bfloat16, torch.bfloat16, 1, 4),  # padded groups
    (256, 224, 32, True, True, "gptq_v2", True, True, torch.float16, torch.bfloat16, 7, 1),  # irregular groups
    (264, 512, 128, False, True, "gptq", False, True, torch.bfloat16, torch.float16, 16, 8),  # one block a split
]


@gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group,act,asym,fmt,irregular,fragment,dtype,scale_dtype,split_k,warps_k", CASES)
def test_cuda_gemv_matches_float64_reference(built, m, n, k, group, act, asym, fmt, irregular, fragment, dtype,
                                             scale_dtype, split_k, warps_k):
    seed = n + k + group + m
    layer, scales, weight = gptq_layer(n, k, group, act, asym, fmt, seed, irregular, fragment, scale_dtype)
    assert cuda_gemv_problem(weight, m, dtype) is None
    wide = torch.randn(m, k + 8, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    x = wide[:, :k]  # a row stride larger than K
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    workspace = torch.zeros(m * n, device=DEVICE)
    counters = torch.zeros(n // 16 + 1, dtype=torch.int32, device=DEVICE)
    gptq_gemv_cuda(built, x, weight, CudaGemvConfig(split_k, warps_k), out, workspace, counters)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "an output element was not written"
    ref = reference(x, layer.codes, scales.float(), layer.zeros, layer.g_idx, None)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert not workspace.any() and not counters.any(), "split-K left the workspace dirty"


def pack_codes_4bit(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K/8, N], code j of word w at bits 4j (vectorised: big layers)."""
    n, k = codes.shape
    grouped = codes.T.reshape(k // 8, 8, n).long()
    words = sum(grouped[:, j] << (4 * j) for j in range(8))
    return (words - ((words >> 31) << 32)).to(torch.int32)


@gpu
@pytest.mark.parametrize("m", [1, 4])
def test_cuda_gemv_on_a_llama_sized_layer_with_bias_and_graph_replay(built, m):
    """A 4096 x 11008 layer (a down_proj) with bias, run through a captured CUDA graph (as the decode step runs it)
    with fresh inputs copied in before each replay."""
    n, k, group = 4096, 11008, 128
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    groups = k // group
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(1, 16, (groups, n), generator=gen)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    qzeros = pack_codes_4bit(zeros - 1).T.contiguous()  # v1 stores zero - 1, packed along N: [groups, N / 8]
    bias = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    weight = repack_gptq(pack_codes_4bit(codes).to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), g_idx.to(DEVICE), 4,
                         "gptq", bias.to(DEVICE))
    config = CudaGemvConfig(split_k=8, warps_k=4)
    x = torch.zeros(m, k, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE)
    workspace = torch.zeros(m * n, device=DEVICE)
    counters = torch.zeros(n // 16, dtype=torch.int32, device=DEVICE)
    gptq_gemv_cuda(built, x, weight, config, out, workspace, counters)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gptq_gemv_cuda(built, x, weight, config, out, workspace, counters)
    for trial in range(3):
        fresh = torch.randn(m, k, generator=torch.Generator().manual_seed(10 + trial)).to(torch.bfloat16)
        x.copy_(fresh.to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(fresh, codes, scales.float(), zeros, g_idx, bias)
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]
    assert not workspace.any() and not counters.any()


@gpu
def test_the_backend_offers_and_runs_cuda_plans(built):
    layer = random_gptq_codes(256, 512, 4, 128, True, True, "gptq", seed=3)
    tensors = GptqLinearTensors(layer.qweight.to(DEVICE), layer.qzeros.to(DEVICE), layer.scales.to(DEVICE),
                                layer.g_idx.to(DEVICE), None, 4, 128, "gptq")
    backend = TritonBackend(tune=False)
    weight = backend.prepare(tensors)
    assert backend.cuda_gemv_ready
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    plans = [p for p in candidate_plans(weight, 1, x.dtype, 132, cuda_gemv=True) if p.kind == "cuda_gemv"]
    assert plans
    ref = reference(x, layer.codes, layer.scales, layer.zeros, layer.g_idx, None)
    for plan in plans:
        assert relative_error(backend.run_plan(plan, x, weight), ref) < TOLERANCE[torch.float16], plan.describe()


def cpu_weight(bits=4, n=96, k=160, group=32):
    layer = random_gptq_codes(n, k, bits, group, False, True, "gptq", seed=bits)
    return repack_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, "gptq")


def test_no_cuda_means_no_extension_and_a_reason():
    gemv = load_cuda_gemv(torch.device("cpu"))
    assert gemv.module is None and "CUDA" in gemv.problem


def test_the_switch_turns_the_extension_off(monkeypatch):
    monkeypatch.setenv("QTOOL_CUDA_KERNELS", "off")
    gemv = load_cuda_gemv(torch.device("cuda"))
    assert gemv.module is None and "QTOOL_CUDA_KERNELS" in gemv.problem


def test_cuda_plans_are_candidates_only_where_built_and_servable():
    weight = cpu_weight()
    kinds = lambda plans: {p.kind for p in plans}  # noqa: E731
    assert "cuda_gemv" not in kinds(candidate_plans(weight, 1, torch.float16, 132))
    assert "cuda_gemv" in kinds(candidate_plans(weight, 1, torch.float16, 132, cuda_gemv=True))
    assert "cuda_gemv" in kinds(candidate_plans(weight, 4, torch.bfloat16, 132, cuda_gemv=True))
    assert "cuda_gemv" not in kinds(candidate_plans(weight, 5, torch.float16, 132, cuda_gemv=True))
    assert "cuda_gemv" not in kinds(candidate_plans(cpu_weight(bits=8), 1, torch.float16, 132, cuda_gemv=True))
    assert "cuda_gemv" not in kinds(candidate_plans(weight, 1, torch.float32, 132, cuda_gemv=True))
    assert "4-bit" in cuda_gemv_problem(cpu_weight(bits=3), 1, torch.float16)


def test_a_cuda_plan_round_trips_through_the_plan_types():
    plan = Plan("cuda_gemv", CudaGemvConfig(split_k=6, warps_k=8))
    rebuilt = Plan(plan.kind, PLAN_TYPES[plan.kind](**vars(plan.config)))
    assert rebuilt == plan and "cuda_gemv(split_k=6, warps_k=8)" == plan.describe()


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("k,split_k", [(4096, 1), (4096, 16), (11008, 3), (28672, 1), (160, 64)])
def test_splits_cover_k_and_respect_the_shared_memory_limit(m, k, split_k):
    weight = cpu_weight(n=8, k=k, group=128 if k % 128 == 0 else 32)
    per_split, splits = split_launch(weight, m, CudaGemvConfig(split_k))
    total = -(-k // BLOCK_ROWS)
    assert per_split == blocks_per_split(weight, m, split_k)
    assert (splits - 1) * per_split < total <= splits * per_split  # every block in one split, no split empty
    assert m * per_split * (BLOCK_ROWS + 1) * 4 <= SHARED_LIMIT
    assert splits >= min(split_k, total)
