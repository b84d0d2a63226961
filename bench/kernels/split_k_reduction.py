"""What the split-K reduction alone costs on the GPU, for the tile/split shapes the tuner picks (bench/RESULTS.md):
a kernel whose programs only finish their tile, the way the GEMM/GEMV kernels do, timed like the kernels
(kernels/timing.py). Five ways to finish:
  none       every program stores its tile to the output (no reduction; the launch-and-store floor)
  kernels    kernels/gptq_triton_common.finish_tile, what the kernels do: float32 atomic adds into a zeroed
             workspace; the last split to arrive (by an acq_rel counter) reads the sums by adding zero atomically
             (vector atomics) and stores zeros
  exchange   the same adds; the last split takes the sums out by one scalar atomic exchange per element (what the
             kernels did before the atomic read-back)
  load_zero  the same adds; the last split loads the sums from L2 (ld.global.cg) and stores zeros
  slices     every split stores its partial tile to its own workspace slice; the last to arrive loads the slices
             and sums them (the workspace is SPLIT_K times larger)
Each way is also checked against the sum it should read (the "correct" column), because a faster read-back is only
usable if it sees every other program's atomic adds. What each way cost and which were correct: bench/RESULTS.md
("Kernels", split-K reduction) and bench/kernels/notes.md.

    python bench/kernels/split_k_reduction.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from qtool.kernels.gptq_triton_common import add_partial_tile, finish_tile, store_output
from qtool.kernels.timing import time_calls_in_graph

# (M, N, BM, BN, split): the plans picked in bench/RESULTS.md (7B o_proj M = 64 and 16, 7B qkv M = 16, 70B o_proj M = 64,
# and the M = 1 GEMV's 1024-column tiles)
CASES = ((64, 4096, 64, 64, 4), (64, 8192, 64, 64, 4), (16, 4096, 16, 64, 8), (16, 12288, 16, 64, 6),
         (1, 4096, 1, 1024, 64), (1, 12288, 1, 1024, 43), (1, 57344, 1, 1024, 9))
WAYS = ("none", "kernels", "exchange", "load_zero", "slices")


@triton.jit
def finish_tile_slices(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id, pid_k,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ws_ptrs + pid_k * M * N, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel")
    if arrived == SPLIT_K - 1:
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for k in tl.static_range(SPLIT_K):
            total += tl.load(ws_ptrs + k * M * N, mask=mask, other=0.0, cache_modifier=".cg")
        store_output(total, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
        tl.atomic_xchg(counter_ptr + tile_id, 0, sem="relaxed")


@triton.jit
def finish_tile_read_back(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EXCHANGE: tl.constexpr):
    """The kernels' atomic adds; the last split takes the sums by one atomic exchange per element (EXCHANGE) or
    reads them by a plain L2 load and stores zeros."""
    ws_ptrs, mask, arrived = add_partial_tile(acc, offs_m, offs_n, M, N, ws_ptr, counter_ptr, tile_id)
    if arrived == SPLIT_K - 1:
        if EXCHANGE:
            bits_ptrs = ws_ptrs.to(tl.pointer_type(tl.int32))
            old = tl.atomic_xchg(bits_ptrs, tl.zeros(acc.shape, dtype=tl.int32), mask=mask, sem="relaxed")
            total = tl.where(mask, old.to(tl.float32, bitcast=True), 0.0)
        else:
            total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(ws_ptrs, tl.zeros(acc.shape, dtype=tl.float32), mask=mask)
        store_output(total, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
        tl.atomic_xchg(counter_ptr + tile_id, 0, sem="relaxed")


@triton.jit
def finish_only_kernel(out_ptr, ws_ptr, counter_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
                       WAY: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_n = tl.cdiv(N, BN)
    offs_m = (pid // grid_n) * BM + tl.arange(0, BM)
    offs_n = (pid % grid_n) * BN + tl.arange(0, BN)
    acc = tl.full((BM, BN), 1.0, tl.float32) * (pid_k + 1).to(tl.float32)
    if WAY == 0:
        store_output(acc, offs_m, offs_n, M, N, out_ptr, N, out_ptr, False)
    elif WAY == 1:
        finish_tile(acc, offs_m, offs_n, M, N, out_ptr, N, out_ptr, ws_ptr, counter_ptr, pid, SPLIT_K, False)
    elif WAY == 4:
        finish_tile_slices(acc, offs_m, offs_n, M, N, out_ptr, N, out_ptr, ws_ptr, counter_ptr, pid, pid_k, SPLIT_K,
                           False)
    else:  # 2 exchange, 3 load_zero
        finish_tile_read_back(acc, offs_m, offs_n, M, N, out_ptr, N, out_ptr, ws_ptr, counter_ptr, pid, SPLIT_K,
                              False, WAY == 2)


def time_way(m: int, n: int, bm: int, bn: int, split: int, way: int) -> tuple[float, bool]:
    """Microseconds per call and whether the output is the expected sum 1 + 2 + ... + split."""
    out = torch.zeros(m, n, dtype=torch.bfloat16, device="cuda")
    ws = torch.zeros(split * m * n, dtype=torch.float32, device="cuda")
    counters = torch.zeros(triton.cdiv(m, bm) * triton.cdiv(n, bn), dtype=torch.int32, device="cuda")
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)

    def call():
        finish_only_kernel[grid](out, ws, counters, m, n, BM=bm, BN=bn, SPLIT_K=split, WAY=way, num_warps=4)

    us = time_calls_in_graph([call])
    # every way but the first sums 1 + 2 + ... + split, rounded once to the output dtype
    expected = torch.tensor(split * (split + 1) / 2).to(out.dtype).float().item() if way else None
    workspace_clean = way == WAYS.index("slices") or bool((ws == 0).all())  # slices are overwritten, not zeroed
    ok = expected is None or bool((out.float() == expected).all() and workspace_clean and (counters == 0).all())
    return us, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    rows = []
    print("| M | N | tile | split | " + " | ".join(f"{w} us" for w in WAYS) + " | ways that summed right |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, n, bm, bn, split in CASES:
        times, correct = {}, []
        for way, name in enumerate(WAYS):
            times[name], ok = time_way(m, n, bm, bn, split, way)
            if ok:
                correct.append(name)
        rows.append(dict(M=m, N=n, BM=bm, BN=bn, split=split, correct=correct, **{f"{k}_us": v for k, v in times.items()}))
        print(f"| {m} | {n} | {bm}x{bn} | {split} | " + " | ".join(f"{times[w]:.2f}" for w in WAYS)
              + f" | {', '.join(correct)} |", flush=True)
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__)
    Path(args.out, "split_k_reduction.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
