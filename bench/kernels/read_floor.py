"""How fast can any kernel read a layer's 4-bit weights on this GPU? A read-only Triton kernel streams exactly the
bytes our kernels read for each Llama-2 layer shape of bench/kernels/kernels.py (codes, scales, zeros: one flat buffer),
best of several grids, plus torch's own max-reduction over the same bytes; bf16 cuBLAS and our tuned kernel at
M = 1 and 16 are timed in the same run, the same way (kernels/timing.py: graph replay over enough copies to
defeat the L2). bf16 / read-only is the most any weight-only 4-bit kernel could gain over bf16 at that M on this
machine: a kernel that does its math for free still has to read its weights. Needs CUDA.

    python bench/kernels/read_floor.py [--out DIR] [--m 1,16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import triton
import triton.language as tl

from qtool.kernels.timing import copies_to_defeat_l2, time_calls_in_graph
from qtool.kernels.triton_backend import TritonBackend, candidate_plans


@triton.jit
def read_words_kernel(src_ptr, out_ptr, n_words, words_per_program, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """XOR of this program's range of words (so the loads cannot be dropped); one int32 out per program."""
    pid = tl.program_id(0)
    begin = pid * words_per_program
    end = tl.minimum(begin + words_per_program, n_words)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for off in range(begin, end, BLOCK):
        off = tl.multiple_of(off, BLOCK)
        idx = off + tl.arange(0, BLOCK)
        if EVEN:
            acc ^= tl.load(src_ptr + idx)
        else:
            acc ^= tl.load(src_ptr + idx, mask=idx < end, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


READ_BLOCKS = (2048, 8192)
READ_WARPS = (4, 8)
READ_PROGRAMS_PER_SM = (1, 2, 4, 8, 16, 0)  # 0: one block per program


def read_configs(n_words: int, num_sms: int) -> list[tuple[int, int, int]]:
    """(BLOCK, warps, programs) to try for a buffer of n_words."""
    configs = []
    for block in READ_BLOCKS:
        for warps in READ_WARPS:
            for per_sm in READ_PROGRAMS_PER_SM:
                programs = triton.cdiv(n_words, block) if per_sm == 0 else min(per_sm * num_sms, triton.cdiv(n_words, block))
                if (block, warps, programs) not in configs:
                    configs.append((block, warps, programs))
    return configs


def launch_read(src: torch.Tensor, out: torch.Tensor, block: int, warps: int, programs: int, grid: int | None = None) -> int:
    """Reads src with `programs` programs of BLOCK-word loads (fewer when the ranges round up); returns the grid.
    grid, if given, launches only that many of them (a test's way of leaving words out)."""
    n_words = src.numel()
    per_program = triton.cdiv(triton.cdiv(n_words, programs), block) * block
    full_grid = triton.cdiv(n_words, per_program)
    read_words_kernel[(grid or full_grid,)](src, out, n_words, per_program, BLOCK=block, EVEN=n_words % block == 0,
                                            num_warps=warps)
    return full_grid


def words_xor(src: torch.Tensor) -> int:
    """The XOR of every word of src, on the host: what a kernel that reads each word once folds to."""
    return int(np.bitwise_xor.reduce(src.cpu().numpy()))


def check_read_covers_buffer(src: torch.Tensor, out: torch.Tensor, block: int, warps: int, programs: int,
                             want: int, grid: int | None = None):
    """The per-program XORs must fold to want (words_xor(src)), or the timing is of a kernel that skips words."""
    full_grid = launch_read(src, out, block, warps, programs, grid)
    if int(np.bitwise_xor.reduce(out[:full_grid].cpu().numpy())) != want:
        raise RuntimeError(f"read-only kernel BLOCK={block} programs={programs} skipped words")


def time_read_only(nbytes: int, device: torch.device, num_sms: int) -> dict:
    """Best read-only time over READ configs and torch.amax for nbytes (rounded up to whole words)."""
    n_words = triton.cdiv(nbytes, 4)
    copies = copies_to_defeat_l2(n_words * 4, device)
    bufs = [torch.randint(-(1 << 31), 1 << 31, (n_words,), dtype=torch.int32, device=device) for _ in range(copies)]
    out = torch.empty(triton.cdiv(n_words, min(READ_BLOCKS)), dtype=torch.int32, device=device)
    want = words_xor(bufs[0])  # once: the buffer is up to 246 MB
    timings = []
    for block, warps, programs in read_configs(n_words, num_sms):
        check_read_covers_buffer(bufs[0], out, block, warps, programs, want)
        us = time_calls_in_graph([lambda b=b: launch_read(b, out, block, warps, programs) for b in bufs])
        timings.append({"block": block, "warps": warps, "programs": programs, "us": us})
    torch_us = time_calls_in_graph([lambda b=b: torch.amax(b) for b in bufs])
    best = min(timings, key=lambda t: t["us"])
    return {"bytes": n_words * 4, "read_us": min(best["us"], torch_us), "read_triton_us": best["us"],
            "read_triton_config": best, "read_torch_amax_us": torch_us, "read_timings": timings}


def best_of_each_kind(backend: TritonBackend, layer, m: int, kinds: list[str], bench, gen) -> dict:
    """{kind: {"plan", "us"}} for the fastest right candidate of each kind, plus bf16's time, at M rows."""
    weight = layer.weights[0]
    device = weight.qweight.device
    xs = [torch.randn(m, layer.k, generator=gen, device=device).to(bench.DTYPE) for _ in layer.weights]
    ref = xs[0].double() @ layer.weight64.T
    plans = candidate_plans(weight, m, bench.DTYPE, torch.cuda.get_device_properties(device).multi_processor_count,
                            cuda_gemv=backend.cuda_gemv_ready)
    result = {"bf16_us": time_calls_in_graph([lambda i=i: torch.nn.functional.linear(xs[i % len(xs)], w)
                                              for i, w in enumerate(layer.bf16)])}
    for kind in kinds:
        best = None
        for plan in (p for p in plans if p.kind == kind):
            error = bench.relative_error(backend.run_plan(plan, xs[0], weight), ref)
            if not error < bench.TOLERANCE:
                result.setdefault("wrong", []).append((plan.describe(), error))
                continue
            us = time_calls_in_graph([lambda i=i, w=w: backend.run_plan(plan, xs[i], w)
                                      for i, w in enumerate(layer.weights)])
            if best is None or us < best["us"]:
                best = {"plan": plan.describe(), "us": us}
        result[kind] = best
    usable = [result[kind]["us"] for kind in kinds if result.get(kind)]
    result["ours_us"] = min(usable) if usable else None
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for read_floor.json")
    parser.add_argument("--m", default="1,16", help="comma-separated M values for bf16 and our kernel")
    parser.add_argument("--by-kind", default="",
                        help="comma-separated plan kinds (e.g. gemv,cuda_gemv): instead of the tuned kernel, the best "
                             "candidate of each kind at each M, every candidate checked against the float64 product")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.by_kind.split(",") if kind]
    if not torch.cuda.is_available():
        print("bench/kernels/read_floor.py needs a CUDA device", file=sys.stderr)
        return 2
    from profile_kernels import bench_kernels_module  # a sibling script: bench/kernels/ is this script's sys.path[0]

    bench = bench_kernels_module()
    began = time.time()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(device)
    bandwidth = bench.copy_bandwidth(device)
    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "copy_bandwidth_GBps": bandwidth / 1e9}
    print(meta, flush=True)
    backend = TritonBackend()
    gen = torch.Generator(device=device).manual_seed(0)
    m_values = [int(v) for v in args.m.split(",")]
    rows = []
    for model, name, k, n in bench.SHAPES:
        layer = bench.build_layer(backend, model, name, k, n, 4, gen, device)
        row = {"model": model, "linear": name, "K": k, "N": n, "bits": 4,
               "floor_us": layer.weights[0].nbytes() / bandwidth * 1e6}
        row.update(time_read_only(layer.weights[0].nbytes(), device, props.multi_processor_count))
        for m in m_values:
            if kinds:
                row[f"M{m}"] = best_of_each_kind(backend, layer, m, kinds, bench, gen)
                continue
            r = bench.bench_row(backend, layer, m, bandwidth, time_calls_in_graph, gen)
            row[f"M{m}"] = {key: r.get(key) for key in ("ours_us", "bf16_us", "tinygemm_us", "plan", "ours_err",
                                                         "candidates")}
        rows.append(row)
        del layer
        torch.cuda.empty_cache()
        print(f"[{time.time() - began:4.0f}s] {model} {name}: read-only {row['read_us']:.1f} us "
              f"(triton {row['read_triton_us']:.1f}, amax {row['read_torch_amax_us']:.1f}), floor {row['floor_us']:.1f}; "
              + ", ".join(f"M={m} ours {row[f'M{m}']['ours_us']} bf16 {row[f'M{m}']['bf16_us']}"
                          + "".join(f" {kind} {row[f'M{m}'][kind]}" for kind in kinds) for m in m_values),
              flush=True)
    meta["seconds"] = time.time() - began
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "read_floor.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    print(f"\n{meta}\n")
    head = "| model | linear | MB | read-only µs | read % floor |"
    for m in m_values:
        head += f" M={m} bf16 µs | bf16 / read-only | ours µs | ours / read-only |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['model']} | {r['linear']} | {r['bytes'] / 1e6:.1f} | {r['read_us']:.1f} | "
                f"{100 * r['floor_us'] / r['read_us']:.0f}% |")
        for m in m_values:
            c = r[f"M{m}"]
            bf16, ours = c.get("bf16_us"), c.get("ours_us")
            line += (f" {bf16:.1f} | {bf16 / r['read_us']:.2f}x | {ours:.1f} | {ours / r['read_us']:.2f}x |"
                     if bf16 and ours else " — | — | — | — |")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
