"""Benchmark of the Triton GPTQ matmul on the linear shapes of Llama-2-7B and -70B against bf16 torch's linear
(cuBLAS) and torch's int4 tinygemm: median µs, speedup over bf16, % of the memory-bandwidth floor. Every kernel
is checked against a float64 reference on the GPU before it is timed. Needs CUDA.

    python bench/kernels/kernels.py [--quick] [--out DIR] [--timer graph|dobench] [--budget-s 420]

Timing: each measured op cycles through enough copies of its weights (and inputs) that they do not fit in L2,
the calls are captured in one CUDA graph (no launch gaps), and the median per-call time over several replays
is reported. --timer dobench uses triton.testing.do_bench (which zeroes a 256 MB buffer before every call, so
the L2 holds dirty lines while the op runs) for a cross-check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import triton

from qtool.formats.gptq import unpack_qzeros
from qtool.formats.bitpack import unpack_rows
from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.timing import copies_to_defeat_l2, time_calls_in_graph
from qtool.kernels.triton_backend import TritonBackend, tune_key, weight_copies

SHAPES = [  # (model, linear, in_features K, out_features N)
    ("llama2-7b", "qkv_proj", 4096, 12288),
    ("llama2-7b", "o_proj", 4096, 4096),
    ("llama2-7b", "gate_up_proj", 4096, 22016),
    ("llama2-7b", "down_proj", 11008, 4096),
    ("llama2-70b", "qkv_proj", 8192, 10240),
    ("llama2-70b", "o_proj", 8192, 8192),
    ("llama2-70b", "gate_up_proj", 8192, 57344),
    ("llama2-70b", "down_proj", 28672, 8192),
]
M_ORDER = (1, 16, 64, 256, 1024, 2, 4, 8, 32, 128)  # most telling first, in case the time budget runs out
QUICK_SHAPES = ("o_proj", "gate_up_proj")
QUICK_M = (1, 16, 64, 256, 1024)
EXTRA_BITS_AT_M1 = (3, 8)
GROUP_SIZE = 128
DTYPE = torch.bfloat16
TOLERANCE = 1e-2


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def time_dobench(calls: list) -> float:
    state = {"i": 0}

    def one():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    try:
        ms = triton.testing.do_bench(one, warmup=10, rep=50, return_mode="median")
    except TypeError:
        ms = triton.testing.do_bench(one, warmup=10, rep=50, quantiles=[0.5])[0]
    return ms * 1e3


def copies_for(nbytes: int) -> int:
    return copies_to_defeat_l2(nbytes, torch.device("cuda"))


def random_gptq(k: int, n: int, bits: int, gen: torch.Generator, device: torch.device) -> GptqLinearTensors:
    """A random asymmetric GPTQ v2 layer (any int32 word is a valid packing), groups of 128, no act order."""
    groups = math.ceil(k / GROUP_SIZE)
    qweight = torch.randint(-(1 << 31), 1 << 31, (k * bits // 32, n), dtype=torch.int32, generator=gen, device=device)
    qzeros = torch.randint(-(1 << 31), 1 << 31, (groups, n * bits // 32), dtype=torch.int32, generator=gen, device=device)
    scales = (torch.rand(groups, n, generator=gen, device=device) * 2e-3 + 5e-4).half()
    g_idx = (torch.arange(k, device=device) // GROUP_SIZE).to(torch.int32)
    return GptqLinearTensors(qweight, qzeros, scales, g_idx, None, bits, GROUP_SIZE, "gptq_v2")


def tinygemm_layer(t: GptqLinearTensors):
    """(packed weight, scales_and_zeros) for torch._weight_int4pack_mm, or raises."""
    k, n = t.in_features, t.out_features
    codes = unpack_rows(t.qweight, 4, k).T.contiguous()  # [N, K]
    zeros = unpack_qzeros(t.qzeros, 4, n, t.checkpoint_format).float()
    scales = t.scales.float()
    # tinygemm computes (q - 8) * scale + zero: our s * (q - z) is that with zero = s * (8 - z)
    scales_and_zeros = torch.stack([scales, scales * (8 - zeros)], dim=-1).to(torch.bfloat16).contiguous()
    errors = []
    for packed_input in ((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), codes.to(torch.int32)):
        try:
            return torch._convert_weight_to_int4pack(packed_input.contiguous(), 8), scales_and_zeros
        except Exception as exc:  # the input format changed across torch versions
            errors.append(f"{packed_input.dtype}: {exc}")
    raise RuntimeError("; ".join(errors))


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@dataclasses.dataclass
class Layer:
    model: str
    name: str
    k: int
    n: int
    bits: int
    weights: list  # GptqComputeWeight copies
    weight64: torch.Tensor  # [N, K] float64 reference
    bf16: list | None = None  # [N, K] bf16 copies
    tiny: list | None = None  # (packed, scales_and_zeros) copies
    tiny_error: str | None = None


def build_layer(backend: TritonBackend, model, name, k, n, bits, gen, device, bf16_copies: list | None = None) -> Layer:
    """Our weight copies and the float64 reference; bf16 copies (made here unless given) and tinygemm for 4-bit."""
    tensors = random_gptq(k, n, bits, gen, device)
    first = backend.prepare(tensors)
    weights = weight_copies(first, copies_for(first.nbytes()))
    weight64 = dequantize_gptq(tensors.qweight, tensors.qzeros, tensors.scales, tensors.g_idx, bits,
                               tensors.checkpoint_format, torch.float64)
    layer = Layer(model, name, k, n, bits, weights, weight64)
    if bf16_copies is None:
        w_bf16 = weight64.to(DTYPE)
        bf16_copies = [w_bf16] + [w_bf16.clone() for _ in range(copies_for(w_bf16.numel() * 2) - 1)]
    # the bf16 baseline times a weight of the same shape; its values need only match for the error column
    layer.bf16 = bf16_copies
    if bits == 4:
        try:
            packed, sz = tinygemm_layer(tensors)
            layer.tiny = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies_for(packed.numel() * packed.element_size()) - 1)]
        except Exception as exc:
            layer.tiny_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return layer


def bench_row(backend: TritonBackend, layer: Layer, m: int, bandwidth: float, timer, gen) -> dict:
    device = layer.weights[0].qweight.device
    row = {"model": layer.model, "linear": layer.name, "K": layer.k, "N": layer.n, "bits": layer.bits,
           "group_size": GROUP_SIZE, "M": m}
    n_inputs = max(len(layer.weights), len(layer.bf16 or []), len(layer.tiny or []))
    xs = [torch.randn(m, layer.k, generator=gen, device=device).to(DTYPE) for _ in range(n_inputs)]
    ref = xs[0].double() @ layer.weight64.T
    io_bytes = (m * layer.k + m * layer.n) * 2

    # ours: the first call tunes (and caches) the plan for this M bucket
    started = time.time()
    plan = backend.plan_for(xs[0], layer.weights[0])
    row["tune_s"] = round(time.time() - started, 2)
    row["plan"] = plan.describe()
    key = tune_key(layer.weights[0], m, DTYPE, device)
    row["candidates"] = backend.tuner.timings.get(key, [])
    y = backend.run_plan(plan, xs[0], layer.weights[0])
    row["ours_err"] = relative_error(y, ref)
    if row["ours_err"] < TOLERANCE:
        calls = [lambda i=i: backend.run_plan(plan, xs[i % n_inputs], layer.weights[i]) for i in range(len(layer.weights))]
        row["ours_us"] = timer(calls)
        floor_us = (layer.weights[0].nbytes() + io_bytes) / bandwidth * 1e6
        row["ours_floor_pct"] = 100 * floor_us / row["ours_us"]
        row["ours_tflops"] = 2 * m * layer.k * layer.n / row["ours_us"] / 1e6
    else:
        row["ours_us"] = None
        row["note"] = "ours WRONG: not timed"

    if layer.bf16 is not None:
        y = torch.nn.functional.linear(xs[0], layer.bf16[0])
        if layer.bits == 4:  # the bf16 copies hold this layer's weight (3/8-bit rows reuse them for timing only)
            row["bf16_err"] = relative_error(y, ref)
        calls = [lambda i=i: torch.nn.functional.linear(xs[i % n_inputs], layer.bf16[i]) for i in range(len(layer.bf16))]
        row["bf16_us"] = timer(calls)
        row["bf16_floor_pct"] = 100 * ((layer.k * layer.n * 2 + io_bytes) / bandwidth * 1e6) / row["bf16_us"]
        if row.get("ours_us"):
            row["speedup_vs_bf16"] = row["bf16_us"] / row["ours_us"]
    if layer.tiny is not None:
        try:
            packed, sz = layer.tiny[0]
            y = torch._weight_int4pack_mm(xs[0], packed, GROUP_SIZE, sz)
            row["tinygemm_err"] = relative_error(y, ref)
            calls = [lambda i=i: torch._weight_int4pack_mm(xs[i % n_inputs], layer.tiny[i][0], GROUP_SIZE, layer.tiny[i][1])
                     for i in range(len(layer.tiny))]
            row["tinygemm_us"] = timer(calls)
            if row.get("bf16_us"):
                row["tinygemm_speedup_vs_bf16"] = row["bf16_us"] / row["tinygemm_us"]
        except Exception as exc:
            row["tinygemm_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    elif layer.tiny_error:
        row["tinygemm_error"] = layer.tiny_error
    return row


def fmt(value, digits=1, suffix=""):
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | linear | K→N | bits | M | ours µs | bf16 µs | tinygemm µs | speedup vs bf16 | tinygemm vs bf16 | ours % BW floor | bf16 % BW floor | ours err | plan |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['linear']} | {r['K']}→{r['N']} | {r['bits']} | {r['M']} | ERROR: {r['error'][:80]} |||||||||")
            continue
        tiny = fmt(r.get("tinygemm_us")) if "tinygemm_error" not in r else "n/a"
        if r.get("tinygemm_err", 0) > TOLERANCE:
            tiny += f" (wrong: err {r['tinygemm_err']:.1e})"
        lines.append(
            f"| {r['model']} | {r['linear']} | {r['K']}→{r['N']} | {r['bits']} | {r['M']} | {fmt(r.get('ours_us'))} | "
            f"{fmt(r.get('bf16_us'))} | {tiny} | {fmt(r.get('speedup_vs_bf16'), 2, 'x')} | "
            f"{fmt(r.get('tinygemm_speedup_vs_bf16'), 2, 'x')} | {fmt(r.get('ours_floor_pct'), 0, '%')} | "
            f"{fmt(r.get('bf16_floor_pct'), 0, '%')} | {r.get('ours_err', 0):.1e} | {r.get('plan', '')[:60]} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, M in 1/16/64/256/1024")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for bench_kernels.json")
    parser.add_argument("--timer", choices=("graph", "dobench"), default="graph")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rows after this many seconds")
    parser.add_argument("--m", default=None, help="comma-separated M values to run, in this order (default: all)")
    parser.add_argument("--extra-bits", default=",".join(map(str, EXTRA_BITS_AT_M1)),
                        help="comma-separated widths also run at M = 1 besides 4 (empty: none)")
    args = parser.parse_args(argv)
    extra_bits = tuple(int(v) for v in args.extra_bits.split(",") if v.strip())
    if not torch.cuda.is_available():
        print("bench/kernels/kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    began = time.time()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    timer = time_calls_in_graph if args.timer == "graph" else time_dobench
    props = torch.cuda.get_device_properties(device)
    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "timer": args.timer}
    bandwidth = copy_bandwidth(device)
    meta["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"{meta}", flush=True)

    shapes = [s for s in SHAPES if not args.quick or s[1] in QUICK_SHAPES]
    m_values = QUICK_M if args.quick else M_ORDER
    if args.m:
        m_values = tuple(int(v) for v in args.m.split(","))
    backend = TritonBackend()
    gen = torch.Generator(device=device).manual_seed(0)
    layers = {}
    for model, name, k, n in shapes:
        base = layers[(model, name, 4)] = build_layer(backend, model, name, k, n, 4, gen, device)
        for bits in extra_bits:
            layers[(model, name, bits)] = build_layer(backend, model, name, k, n, bits, gen, device, base.bf16)
    print(f"layers ready in {time.time() - began:.0f} s", flush=True)

    schedule = [(m, (model, name, 4)) for m in m_values for model, name, _, _ in shapes]
    if 1 in m_values:
        at = (m_values.index(1) + 1) * len(shapes)
        schedule[at:at] = [(1, (model, name, b)) for b in extra_bits for model, name, _, _ in shapes]
    rows, skipped = [], []
    for m, layer_key in schedule:
        layer = layers[layer_key]
        if time.time() - began > args.budget_s:
            skipped.append({"model": layer.model, "linear": layer.name, "bits": layer.bits, "M": m})
            continue
        try:
            row = bench_row(backend, layer, m, bandwidth, timer, gen)
        except Exception as exc:
            row = {"model": layer.model, "linear": layer.name, "K": layer.k, "N": layer.n, "bits": layer.bits, "M": m,
                   "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        rows.append(row)
        print(f"[{time.time() - began:5.0f}s] {layer.model} {layer.name} {layer.bits}-bit M={m}: "
              f"ours {fmt(row.get('ours_us'))} µs, bf16 {fmt(row.get('bf16_us'))} µs, "
              f"tinygemm {fmt(row.get('tinygemm_us'))} µs, plan {row.get('plan', row.get('error', ''))}", flush=True)
    meta["seconds"] = time.time() - began
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "skipped_for_time": skipped}, f, indent=1, default=str)
    rows.sort(key=lambda r: (r["bits"] != 4, r["model"], r["linear"], r["M"]))
    if skipped:
        print(f"\n{len(skipped)} rows skipped for the time budget")
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write), {meta['device']}, {args.timer} timer, "
          f"{meta['seconds']:.0f} s\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
