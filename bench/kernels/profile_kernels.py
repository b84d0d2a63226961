"""One kernel launch per case, fixed plan, no tuning: the program Nsight Compute profiles
(bench/device/gpu_check.sh, stage `profile`). Each case is a layer shape of bench/kernels/kernels.py, an M and the
plan the tuner picked for that row in bench/RESULTS.md, so the counters describe the kernels the tables time.
Needs CUDA.

    python bench/kernels/profile_kernels.py --list
    ncu -k regex:gptq --launch-skip 1 --launch-count 1 ... \
        python bench/kernels/profile_kernels.py --case left_7b_qkv_m16

The kernel runs twice (compile + first launch, then the profiled one) and is checked against float64.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from qtool.kernels.gptq_gemm_left_triton import LEFT_DENORMAL, LEFT_PACKED, LeftGemmConfig
from qtool.kernels.gptq_gemv_triton import GemvConfig
from qtool.kernels.triton_backend import Plan, TritonBackend


def bench_kernels_module():
    """bench/kernels/kernels.py loaded by path (bench/kernels/ is not a package, and a module named `kernels` would
    shadow the package of that name that transformers probes for)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _left(bm, bn, bk, split, warps, stages, mode=LEFT_DENORMAL):
    return Plan("left", LeftGemmConfig(bm, bn, bk, split_k=split, mode=mode, num_warps=warps, num_stages=stages))


def _gemv(block_n, units, split, prefetch):
    return Plan("gemv", GemvConfig(block_n=block_n, units=units, split_k=split, num_warps=4, row_sum_each_tile=True,
                                   prefetch=prefetch))


# name: (K, N, M, plan)
CASES = {
    "gemv_7b_oproj_m1": (4096, 4096, 1, _gemv(1024, 4, 64, True)),
    "gemv_70b_gateup_m1": (8192, 57344, 1, _gemv(1024, 4, 9, False)),
    "left_7b_qkv_m16": (4096, 12288, 16, _left(16, 64, 128, 3, 4, 4)),
    "left_70b_gateup_m16": (8192, 57344, 16, _left(16, 64, 128, 1, 4, 4)),
    "packed_7b_qkv_m16": (4096, 12288, 16, _left(16, 64, 128, 3, 4, 4, LEFT_PACKED)),
    "packed_70b_gateup_m16": (8192, 57344, 16, _left(16, 64, 128, 1, 4, 4, LEFT_PACKED)),
    "packed_70b_down_m64": (28672, 8192, 64, _left(64, 128, 128, 4, 8, 3, LEFT_PACKED)),
    "left_7b_oproj_m64": (4096, 4096, 64, _left(64, 64, 64, 4, 4, 3)),
    "left_70b_gateup_m64": (8192, 57344, 64, _left(64, 64, 128, 1, 4, 4)),
    "left_7b_gateup_m256": (4096, 22016, 256, _left(128, 128, 128, 1, 8, 3)),
    "left_70b_gateup_m256": (8192, 57344, 256, _left(256, 128, 64, 1, 8, 3)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--values", action="store_true", help="print the case's weight values (K x N) and exit")
    args = parser.parse_args(argv)
    if args.list or not args.case:
        print("\n".join(CASES))
        return 0
    if args.values:
        print(CASES[args.case][0] * CASES[args.case][1])
        return 0
    bench = bench_kernels_module()
    k, n, m, plan = CASES[args.case]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = bench.random_gptq(k, n, 4, gen, device)
    backend = TritonBackend(tune=False)
    weight = backend.prepare(tensors)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    for _ in range(2):
        y = backend.run_plan(plan, x, weight)
    torch.cuda.synchronize()
    w64 = bench.dequantize_gptq(tensors.qweight, tensors.qzeros, tensors.scales, tensors.g_idx, 4,
                                tensors.checkpoint_format, torch.float64)
    error = bench.relative_error(y, x.double() @ w64.T)
    print(f"{args.case}: K={k} N={n} M={m} {plan.describe()} relative error {error:.2e}")
    return 0 if error < bench.TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
