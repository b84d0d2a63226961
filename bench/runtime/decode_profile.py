"""Where a batch-1 decode token's GPU time goes: the engine's decode step (eager, the same kernels its CUDA graphs
replay) on the Llama-2-7B-shaped random GPTQ model of engine_decode.py, under torch.profiler. Prints the kernels
by GPU time per decoded token and their sum, to set against engine_decode.py's graph-replay tokens/s (the gap is
what the kernels leave idle between them). The engine's default fuses each layer's q/k/v and gate/up into one
linear each; --fusion both profiles the unfused step too, on the same model in the same process.

    python bench/runtime/decode_profile.py [--context 512] [--new-tokens 32] [--fusion both] [--out profile.json]
    python bench/runtime/decode_profile.py --tiny --device cpu      # smoke test of the code path
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_decode import FUSIONS, LLAMA2_7B, TINY, WAYS, quantize_randomly, random_llama  # noqa: E402

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams  # noqa: E402


def kernel_rows(prof, tokens: int, device: torch.device) -> list[dict]:
    rows = []
    for event in prof.key_averages():
        device_us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if device_us <= 0 or (device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        rows.append({"kernel": event.key[:110], "calls_per_token": round(event.count / tokens, 2),
                     "us_per_token": round(device_us / tokens, 2)})
    return sorted(rows, key=lambda r: -r["us_per_token"])


def profile_decode(model, args, device: torch.device, fuse: bool) -> dict:
    """Kernels per decoded token of a fresh engine's eager decode step (fused projections or not)."""
    context = 32 if args.tiny else args.context
    blocks = -(-(context + args.new_tokens) // 16) + 2
    engine = Engine(model, None, EngineConfig(block_size=16, num_blocks=blocks, max_num_seqs=1,
                                              max_num_batched_tokens=context, fuse_projections=fuse,
                                              **WAYS["eager"]))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    prompt = list(range(3, 3 + context))
    engine.generate(prompt, params)  # warm: compiles and plans outside the profile
    engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # the prefill is profiled too; subtract a one-token request's profile to keep the decode steps alone
    with profile(activities=activities) as prefill_only:
        engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    with profile(activities=activities) as whole:
        engine.generate(prompt, params)
    decoded = args.new_tokens - 1
    prefill = {r["kernel"]: r["us_per_token"] for r in kernel_rows(prefill_only, 1, device)}
    rows = []
    for row in kernel_rows(whole, 1, device):
        us = row["us_per_token"] - prefill.get(row["kernel"], 0.0)
        if us > 0:
            rows.append({"kernel": row["kernel"], "us_per_token": round(us / decoded, 2),
                         "calls_per_token": round(row["calls_per_token"] / decoded, 2)})
    rows.sort(key=lambda r: -r["us_per_token"])
    return {"fuse_projections": fuse, "decode_path": engine.runner.decode_step_reason, "context": context,
            "kernel_us_per_token": round(sum(r["us_per_token"] for r in rows), 2),
            "calls_per_token": round(sum(r["calls_per_token"] for r in rows), 2), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--fusion", default="on", choices=FUSIONS,
                        help="q/k/v and gate/up fused (on, the engine's default), separate (off), or both")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = TINY if args.tiny else LLAMA2_7B
    layers = 2 if args.tiny else args.layers
    model = random_llama(shape, layers, torch.bfloat16 if device.type == "cuda" else torch.float32, device, 0)
    backends = quantize_randomly(model, 4, 128 if not args.tiny else 32, args.backend, 0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    runs = []
    for fuse in {"on": (True,), "off": (False,), "both": (True, False)}[args.fusion]:
        run = profile_decode(model, args, device, fuse)
        runs.append(run)
        total = run["kernel_us_per_token"]
        print(f"{device_name}: {layers} layers, context {run['context']}, backends {backends}, projections "
              f"{'fused' if fuse else 'unfused'}: kernels sum {total:.1f} us in {run['calls_per_token']:.0f} "
              f"launches per decoded token ({1e6 / total if total else 0:.0f} tok/s if back to back)")
        print(f"  decode path: {run['decode_path']}")
        for row in run["rows"][:args.top]:
            print(f"  {row['us_per_token']:>9.2f} us  {row['calls_per_token']:>6.2f} calls  {row['kernel']}")
    if len(runs) == 2 and runs[0]["kernel_us_per_token"] and runs[1]["kernel_us_per_token"]:
        print(f"fused / unfused kernel time per token: {runs[0]['kernel_us_per_token']:.1f} / "
              f"{runs[1]['kernel_us_per_token']:.1f} us; launches {runs[0]['calls_per_token']:.0f} / "
              f"{runs[1]['calls_per_token']:.0f}")
    if args.out:
        # the first run's numbers at the top level, as before --fusion; every run under "runs"
        first = runs[0]
        Path(args.out).write_text(json.dumps({"device": device_name, "layers": layers, "context": first["context"],
                                              "kernel_us_per_token": first["kernel_us_per_token"],
                                              "rows": first["rows"], "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
