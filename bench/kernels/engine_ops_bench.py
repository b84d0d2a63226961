"""The engine's per-token ops on the GPU: each Triton kernel (qtool/kernels/engine_ops_triton.py) against its torch
reference (engine_ops_ref.py), and paged decode attention also against torch's scaled_dot_product_attention over
a dense (unpaged) cache of the same sizes, for 7B-shaped decode: hidden 4096, 32 query heads, 32 or 8 kv heads,
head_dim 128, intermediate 11008, batch 1/8/64, contexts 512/2048, block size 16. Before timing, every op is
checked against its reference on the GPU (max abs error printed; a kernel past its tolerance fails the run).
Times are triton.testing.do_bench medians (eager launches, so small ops include launch gaps) and
do_bench_cudagraph medians (launches replayed from a graph, as the engine's decode step runs them); GB/s is the
bytes each op must move at least over the graph time. Needs CUDA; reads no file.

    python bench/kernels/engine_ops_bench.py [--out results.json] [--batches 1,8,64] [--contexts 512,2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import torch
import triton
import triton.testing

from qtool.kernels.engine_ops_ref import add_rms_norm_ref, paged_decode_attention_ref, rope_and_cache_ref, silu_mul_ref
from qtool.kernels.engine_ops_triton import (
    add_rms_norm_triton,
    decode_splits,
    paged_decode_attention_triton,
    rope_and_cache_triton,
    silu_mul_triton,
)

HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE, BLOCK_SIZE = 4096, 32, 128, 11008, 16
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def median_us(fn, capturable: bool = True) -> tuple[float, float | None]:
    """(eager median, CUDA-graph median) in microseconds; the graph figure is None for an op that syncs the
    host (not capturable) or where capture fails."""
    eager = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    if not capturable:
        return eager, None
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3
    except Exception as error:  # a reference that syncs the host (boolean indexing) cannot be captured
        print(f"  (no graph timing: {type(error).__name__}: {str(error).splitlines()[0][:100]})", file=sys.stderr)
        graph = None
    return eager, graph


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs().max().item() if got.numel() else 0.0


class Recorder:
    def __init__(self, dtype: torch.dtype):
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.tolerance = TOLERANCE[dtype]

    def check(self, op: str, shape: dict, errors: dict[str, float]) -> None:
        for what, error in errors.items():
            ok = math.isfinite(error) and error <= self.tolerance
            print(f"  check {op} {what}: max abs error {error:.3g} {'ok' if ok else 'OVER ' + str(self.tolerance)}")
            if not ok:
                self.failures.append(f"{op} {shape} {what}: {error:.3g}")

    def time(self, op: str, impl: str, shape: dict, fn, min_bytes: int, errors: dict | None = None,
             capturable: bool = True) -> None:
        eager, graph = median_us(fn, capturable)
        gbps = min_bytes / (graph * 1e-6) / 1e9 if graph else None
        row = dict(op=op, impl=impl, **shape, eager_us=round(eager, 2),
                   graph_us=None if graph is None else round(graph, 2),
                   min_bytes=min_bytes, graph_gbps=None if gbps is None else round(gbps, 1))
        if errors:
            row["max_abs_error"] = errors
        self.rows.append(row)


def attention_inputs(batch: int, kv_heads: int, context: int, dtype: torch.dtype, gen: torch.Generator):
    """A paged cache holding `batch` sequences of `context` tokens in shuffled blocks, their tables, and the dense
    [B, kv_heads, context, d] copies scaled_dot_product_attention reads."""
    blocks_per_seq = triton.cdiv(context, BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    shape = (num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    order = torch.randperm(num_blocks - 1, device="cuda", generator=gen)[: batch * blocks_per_seq] + 1
    tables = order.view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn((batch, HEADS, HEAD_DIM), device="cuda", dtype=dtype, generator=gen)
    positions = torch.arange(context, device="cuda")
    slots = tables.long()[:, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE  # [B, ctx]
    dense_k = key_cache.view(-1, kv_heads, HEAD_DIM)[slots].permute(0, 2, 1, 3).contiguous()
    dense_v = value_cache.view(-1, kv_heads, HEAD_DIM)[slots].permute(0, 2, 1, 3).contiguous()
    return query, key_cache, value_cache, tables, lens, dense_k, dense_v


def bench_attention(rec: Recorder, batch: int, kv_heads: int, context: int, dtype, gen, num_sms: int) -> None:
    query, kc, vc, tables, lens, dense_k, dense_v = attention_inputs(batch, kv_heads, context, dtype, gen)
    scale = HEAD_DIM ** -0.5
    splits = decode_splits(batch, kv_heads, tables.shape[1], BLOCK_SIZE, HEAD_DIM, num_sms)
    shape = dict(batch=batch, context=context, kv_heads=kv_heads, splits=splits)
    print(f"paged_decode_attention batch {batch} context {context} kv_heads {kv_heads} (splits {splits})")
    ref = paged_decode_attention_ref(query, kc, vc, tables, lens, scale)
    got = paged_decode_attention_triton(query, kc, vc, tables, lens, scale)
    one_split = paged_decode_attention_triton(query, kc, vc, tables, lens, scale, num_splits=1)
    window = paged_decode_attention_triton(query, kc, vc, tables, lens, scale, sliding_window=context // 3)
    window_ref = paged_decode_attention_ref(query, kc, vc, tables, lens, scale, sliding_window=context // 3)
    q4 = query.unsqueeze(2)  # [B, heads, 1, d]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, dense_k, dense_v, scale=scale,  # noqa: E731
                                                                   enable_gqa=kv_heads != HEADS)
    errors = {"triton": max_error(got, ref), "triton_1split": max_error(one_split, ref),
              "triton_window": max_error(window, window_ref), "sdpa": max_error(sdpa().squeeze(2), ref)}
    rec.check("paged_decode_attention", shape, errors)
    kv_bytes = 2 * batch * context * kv_heads * HEAD_DIM * kc.element_size()
    rec.time("paged_decode_attention", "triton", shape,
             lambda: paged_decode_attention_triton(query, kc, vc, tables, lens, scale), kv_bytes, errors)
    if splits > 1:
        rec.time("paged_decode_attention", "triton_1split", shape,
                 lambda: paged_decode_attention_triton(query, kc, vc, tables, lens, scale, num_splits=1), kv_bytes)
    rec.time("paged_decode_attention", "torch_ref", shape,
             lambda: paged_decode_attention_ref(query, kc, vc, tables, lens, scale), kv_bytes)
    rec.time("paged_decode_attention", "sdpa_dense", shape, sdpa, kv_bytes)


def bench_norm_silu(rec: Recorder, batch: int, dtype, gen) -> None:
    shape = dict(batch=batch, hidden=HIDDEN)
    print(f"add_rms_norm / silu_mul batch {batch}")
    x, residual = (torch.randn((batch, HIDDEN), device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    weight = torch.randn(HIDDEN, device="cuda", dtype=dtype, generator=gen)
    normed_ref, summed_ref = add_rms_norm_ref(x, residual, weight, 1e-6, 1.0)
    normed, summed = add_rms_norm_triton(x, residual, weight, 1e-6, 1.0)
    errors = {"normed": max_error(normed, normed_ref), "summed": max_error(summed, summed_ref)}
    rec.check("add_rms_norm", shape, errors)
    size = x.element_size()
    norm_bytes = 4 * batch * HIDDEN * size + HIDDEN * size
    rec.time("add_rms_norm", "triton", shape, lambda: add_rms_norm_triton(x, residual, weight, 1e-6), norm_bytes,
             errors)
    rec.time("add_rms_norm", "torch_ref", shape, lambda: add_rms_norm_ref(x, residual, weight, 1e-6), norm_bytes)

    shape = dict(batch=batch, intermediate=INTERMEDIATE)
    gate_up = torch.randn((batch, 2 * INTERMEDIATE), device="cuda", dtype=dtype, generator=gen) * 3
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
    errors = {"out": max_error(silu_mul_triton(gate, up), silu_mul_ref(gate, up))}
    rec.check("silu_mul", shape, errors)
    silu_bytes = 3 * batch * INTERMEDIATE * size
    rec.time("silu_mul", "triton", shape, lambda: silu_mul_triton(gate, up), silu_bytes, errors)
    rec.time("silu_mul", "torch_ref", shape, lambda: silu_mul_ref(gate, up), silu_bytes)


def bench_rope(rec: Recorder, batch: int, kv_heads: int, dtype, gen) -> None:
    shape = dict(batch=batch, kv_heads=kv_heads)
    print(f"rope_and_cache batch {batch} kv_heads {kv_heads}")
    qkv = torch.randn((batch, (HEADS + 2 * kv_heads) * HEAD_DIM), device="cuda", dtype=dtype, generator=gen)
    q, k, v = (part.view(batch, -1, HEAD_DIM) for part in
               qkv.split([HEADS * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=1))
    angles = torch.rand((batch, HEAD_DIM // 2), device="cuda", generator=gen) * 1000
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    num_blocks = 4 * batch + 4
    caches = [torch.zeros((num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM), device="cuda", dtype=dtype)
              for _ in range(4)]
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda", generator=gen)[:batch]
    q_ref = rope_and_cache_ref(q, k, v, cos, sin, caches[0], caches[1], slots)
    q_got = rope_and_cache_triton(q, k, v, cos, sin, caches[2], caches[3], slots)
    errors = {"query": max_error(q_got, q_ref), "key_cache": max_error(caches[2], caches[0]),
              "value_cache": max_error(caches[3], caches[1])}
    rec.check("rope_and_cache", shape, errors)
    size = q.element_size()
    rope_bytes = (2 * HEADS + 4 * kv_heads + 2) * batch * HEAD_DIM * size  # q, k, v, cos, sin in; q, k, v out
    rec.time("rope_and_cache", "triton", shape,
             lambda: rope_and_cache_triton(q, k, v, cos, sin, caches[2], caches[3], slots), rope_bytes, errors)
    rec.time("rope_and_cache", "torch_ref", shape,
             lambda: rope_and_cache_ref(q, k, v, cos, sin, caches[0], caches[1], slots), rope_bytes,
             capturable=False)  # its boolean mask over slots syncs the host


def print_table(rows: list[dict]) -> None:
    keys = ("batch", "context", "kv_heads", "splits")
    print(f"\n{'op':<24}{'impl':<15}{'shape':<40}{'eager us':>10}{'graph us':>10}{'GB/s':>9}")
    for row in rows:
        shape = " ".join(f"{k}={row[k]}" for k in keys if k in row)
        graph = "-" if row["graph_us"] is None else f"{row['graph_us']:.1f}"
        gbps = "-" if row["graph_gbps"] is None else f"{row['graph_gbps']:.0f}"
        print(f"{row['op']:<24}{row['impl']:<15}{shape:<40}{row['eager_us']:>10.1f}{graph:>10}{gbps:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON to this path")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--kv-heads", default="32,8")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_ops_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    batches, contexts, kv_list = ([int(v) for v in s.split(",")] for s in (args.batches, args.contexts, args.kv_heads))
    props = torch.cuda.get_device_properties(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rec = Recorder(dtype)
    for batch in batches:
        for kv_heads in kv_list:
            for context in contexts:
                bench_attention(rec, batch, kv_heads, context, dtype, gen, props.multi_processor_count)
            bench_rope(rec, batch, kv_heads, dtype, gen)
        bench_norm_silu(rec, batch, dtype, gen)
    print_table(rec.rows)
    result = dict(device=props.name, sms=props.multi_processor_count, dtype=args.dtype,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  torch=torch.__version__, triton=triton.__version__, block_size=BLOCK_SIZE, head_dim=HEAD_DIM,
                  heads=HEADS, hidden=HIDDEN, intermediate=INTERMEDIATE, rows=rec.rows, failures=rec.failures)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    if rec.failures:
        print("FAILED correctness checks:\n  " + "\n  ".join(rec.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
