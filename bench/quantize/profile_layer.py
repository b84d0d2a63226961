"""Where one decoder layer's GPTQ time goes on the GPU: a Llama-2-7B-shaped model of N layers (random weights,
big_model.py's writer) quantized by qtool's pipeline with the bench's calibration (128 x 2048 tokens), once per
compute dtype asked for, each run under torch's profiler. Prints the progress timeline (per group), every
linear's solve time and damping from the run's module reports, the top CUDA kernels by total time and the top
CPU ops by self time; one JSON line per run to --out.

    python bench/quantize/profile_layer.py --data .device-data/big --work /tmp/profile_layer --out rows.jsonl
        [--layers 1] [--dtypes float32,bfloat16] [--samples 128 --seqlen 2048] [--shape llama2-7b|tiny]
        [--gpu-memory-gib 10.5] [--no-profiler] [--trace-tensors] [--set FIELD=VALUE ...]
Each progress event also records torch's allocated peak since the event before it (the GPU's per-group peaks); on
the CPU with --trace-tensors, the peak of the run's own live tensor bytes (live_tensors.py) in its place.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import big_model  # noqa: E402  (bench/quantize/ is no package: the model writer)
from live_tensors import LiveTensorBytes  # noqa: E402

HOLDERS_SHOWN = 8  # the ops whose outputs held the most at a traced peak


def profile_run(model_dir: Path, output: Path, data: Path, dtype: str, samples: int, seqlen: int, device: str,
                gpu_memory_bytes: int | None = None, profiled: bool = True, traced: bool = False,
                sets: dict | None = None) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from qtool.config.schema import QUANTIZE_DEFAULT_PRESET, resolve_config
    from qtool.quant.pipeline import quantize_model

    config, _ = resolve_config(QUANTIZE_DEFAULT_PRESET, {
        "output_format": "gptq", "calibration_source": str(data / big_model.CALIBRATION_FILE), "samples": samples,
        "seqlen": seqlen, "compute_dtype": dtype, **(sets or {})})
    began = time.perf_counter()
    timeline: list[tuple[float, str]] = []
    on_gpu = device.startswith("cuda")
    peaks: list[float | None] = []  # torch's allocated peak (GiB) between one progress event and the next
    # on the CPU (`traced`): the run's own live tensor bytes, exactly (live_tensors.py), in place of the GPU's figure
    live = LiveTensorBytes(holders=True) if traced and not on_gpu else None
    held: list[float] = []  # traced: the live bytes (GiB) at each event, where the next step's peak starts from
    holders: list[dict[str, float]] = []  # traced: at each event's peak, the GiB held by the op that made them

    def progress(done: int, total: int, detail: str = "") -> None:
        timeline.append((time.perf_counter() - began, detail))
        if on_gpu:
            peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 3))
            torch.cuda.reset_peak_memory_stats()
        elif live is not None:
            holders.append({op: round(size / 2**30, 3) for op, size in list(live.peak_holders.items())[:HOLDERS_SHOWN]})
            peaks.append(round(live.take_peak() / 2**30, 6))
            held.append(round(live.live / 2**30, 6))
        else:
            peaks.append(None)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with (profile(activities=activities) if profiled else contextlib.nullcontext()) as prof, (live or contextlib.nullcontext()):
        result = quantize_model(str(model_dir), config, str(output), device=device, force=True, progress=progress,
                                gpu_memory_bytes=gpu_memory_bytes)
    seconds = time.perf_counter() - began
    averages = prof.key_averages() if profiled else []
    top = max((p for p in peaks if p is not None), default=None)  # the run's peak: the GPU's, or the traced one
    device_key = "device_time_total" if averages and hasattr(averages[0], "device_time_total") else "cuda_time_total"
    # what ran on the GPU itself (kernels, copies, memsets), not the host ops that launched it nor qtool's ranges,
    # which the profiler also lists with the GPU time they enclose
    on_device = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA and not e.key.startswith("qtool::")]
    kernels = sorted(on_device, key=lambda e: getattr(e, device_key), reverse=True)[:25]
    cpu_ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    # qtool's phase ranges (kernels/profiled_range.py): host time inclusive of what runs inside (a batch's range holds
    # its Hessian products), the GPU time of the kernels launched inside
    phases = {e.key: {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 1), "device_ms": round(getattr(e, device_key) / 1e3, 1)}
              for e in averages if e.key.startswith("qtool::")}
    row = {
        "compute_dtype": dtype, "seconds": round(seconds, 2), "library_seconds": round(result.seconds, 2),
        "timeline": [(round(t, 2), d) for t, d in timeline],
        # the allocated peak since the event before each one: what the step that event ends held at most
        "peaks_gib": peaks, "gpu_memory_bytes": gpu_memory_bytes,
        "estimate": result.memory.get("estimate"),
        "modules": [{"name": m.name, "k": m.in_features, "n": m.out_features, "solve_s": round(m.seconds, 3),
                     "damp": m.damp_percent} for m in result.modules],
        "kernels": [{"name": e.key[:90], "calls": e.count, "total_ms": round(getattr(e, device_key) / 1e3, 1)}
                    for e in kernels],
        "cpu_ops": [{"name": e.key[:90], "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1)}
                    for e in cpu_ops],
        "phases": phases,
        # every kernel's own time once: how busy the GPU was, against the run's seconds
        "device_busy_s": round(sum(getattr(e, device_key) for e in on_device) / 1e6, 2) if averages else None,
        "config": sets or {},
        "gpu_peak_torch_gib": top if on_gpu else None,
        "traced_peak_gib": top if live is not None else None,
        "traced_live_gib": held if live is not None else None,
        "traced_peak_holders": holders if live is not None else None,
        "replay": result.memory.get("estimate", {}).get("replay"),
    }
    return row


def print_row(row: dict) -> None:
    print(f"## compute_dtype {row['compute_dtype']}: {row['seconds']} s (replay {row['replay']}, "
          f"torch peak {row['gpu_peak_torch_gib']} GiB, traced CPU peak {row['traced_peak_gib']} GiB)")
    previous = 0.0
    holders = row.get("traced_peak_holders") or [None] * len(row["timeline"])
    for (t, detail), peak, by_op in zip(row["timeline"], row["peaks_gib"], holders):
        held = "" if peak is None else f"  (peak {peak} GiB before it)"
        print(f"  {t:8.2f} +{t - previous:6.2f}  {detail}{held}")
        if by_op:
            print("            held at that peak: " + ", ".join(f"{op} {size}" for op, size in by_op.items()))
        previous = t
    print(f"  GPU busy {row['device_busy_s']} s of the run's {row['seconds']} s; qtool phases (calls, host ms, GPU ms):")
    for name, phase in row["phases"].items():
        print(f"    {name:24s} {phase['calls']:7d} {phase['cpu_ms']:10.1f} {phase['device_ms']:10.1f}")
    for m in row["modules"]:
        print(f"  solve {m['name']} {m['k']}x{m['n']}: {m['solve_s']} s, damp {m['damp']}")
    print("  top kernels (total ms, calls):")
    for k in row["kernels"]:
        print(f"    {k['total_ms']:10.1f} {k['calls']:7d}  {k['name']}")
    print("  top CPU ops (self ms, calls):")
    for k in row["cpu_ops"]:
        print(f"    {k['self_ms']:10.1f} {k['calls']:7d}  {k['name']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder with wiki.valid.tokens and tokenizer/ (SmolLM2's)")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama2-7b", choices=sorted(big_model.SHAPES))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="run under quantize's --gpu-memory budget")
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE config override (repeatable; big_model.py's)")
    p.add_argument("--no-profiler", action="store_true", help="time and peaks only (the profiler's own cost left out)")
    p.add_argument("--trace-tensors", action="store_true",
                   help="on the CPU: each progress event's peak of the run's own live tensor bytes (live_tensors.py; "
                        "slow: Python sees every op), what the GPU's allocated peak is there")
    args = p.parse_args(argv)
    if args.trace_tensors and not args.no_profiler:
        p.error("--trace-tensors needs --no-profiler (both would see every op)")
    budget = int(args.gpu_memory_gib * 2**30) if args.gpu_memory_gib else None
    work, data = Path(args.work), Path(args.data)
    model_dir = work / f"{args.shape}-{args.layers}L"
    if not (model_dir / "config.json").exists():
        big_model.write_model(big_model.SHAPES[args.shape], args.layers, data / "tokenizer", model_dir, args.device)
    for dtype in args.dtypes.split(","):
        row = profile_run(model_dir, work / f"out-{dtype}", data, dtype, args.samples, args.seqlen, args.device, budget,
                          profiled=not args.no_profiler, traced=args.trace_tensors, sets=big_model.parse_sets(args.set))
        row.update({"shape": args.shape, "layers": args.layers, "samples": args.samples, "seqlen": args.seqlen,
                    **big_model.versions()})
        print_row(row)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
