"""Default plans (kernels/default_plans.py, chosen by rule without timing) against the tuner's best plan on the
Llama-2 layer shapes, same run, same timing as bench/kernels/kernels.py (CUDA-graph replay over weight copies):
what a user who never ran `qtool tune` loses. Every default plan is first checked against a float64 reference.
Needs CUDA.

    python bench/kernels/default_vs_tuned.py [--m 1,16,64,256,1024] [--shapes 7b|70b|all] [--budget-s 480] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton

from qtool.kernels.timing import time_calls_in_graph
from qtool.kernels.triton_backend import GpuFacts, TritonBackend, default_plan, tune_key


def bench_kernels_module():
    """bench/kernels/kernels.py loaded by path (its shapes, random layers and reference)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,64,256,1024")
    parser.add_argument("--shapes", default="7b", choices=("7b", "70b", "all"))
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bench = bench_kernels_module()
    device = torch.device("cuda")
    gpu = GpuFacts.of(device)
    ms = [int(m) for m in args.m.split(",")]
    shapes = [s for s in bench.SHAPES if args.shapes == "all" or s[0].endswith(args.shapes)]
    started = time.time()
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{gpu.name} sm_{gpu.capability[0]}{gpu.capability[1]} {gpu.num_sms} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    for model, name, k, n in shapes:
        tensors = bench.random_gptq(k, n, 4, gen, device)
        backend = TritonBackend(tune=True)
        weight = backend.prepare(tensors)
        copies = bench.weight_copies(weight, bench.copies_for(weight.nbytes()))
        weight64 = bench.dequantize_gptq(tensors.qweight, tensors.qzeros, tensors.scales, tensors.g_idx, 4,
                                         tensors.checkpoint_format, torch.float64)
        for m in ms:
            if time.time() - started > args.budget_s:
                print("budget spent", flush=True)
                break
            x = torch.randn(m, k, generator=gen, device=device).to(bench.DTYPE)
            default = default_plan(weight, m, x.dtype, gpu)
            y = backend.run_plan(default, x, weight)
            error = bench.relative_error(y, x.double() @ weight64.T)
            t0 = time.time()
            tuned = backend.plan_for(x, weight)
            tune_s = time.time() - t0
            times = {}
            for label, plan in (("default", default), ("tuned", tuned)):
                times[label] = time_calls_in_graph([lambda w=w, p=plan: backend.run_plan(p, x, w) for w in copies])
            key = tune_key(weight, m, x.dtype, device)
            timed = [ms_ for _, ms_ in backend.tuner.timings.get(key, []) if isinstance(ms_, float)]
            rank = 1 + sum(1 for t in timed if t * 1e3 < times["default"] * 0.98) if timed else None
            row = {"model": model, "linear": name, "K": k, "N": n, "M": m, "default": default.describe(),
                   "tuned": tuned.describe(), "default_us": times["default"], "tuned_us": times["tuned"],
                   "default_over_tuned": times["default"] / times["tuned"], "default_error": error,
                   "same_plan": default == tuned, "tune_s": round(tune_s, 1), "default_rank_of": [rank, len(timed)]}
            rows.append(row)
            print(f"{model} {name} M={m}: default {times['default']:.1f} us, tuned {times['tuned']:.1f} us "
                  f"(x{row['default_over_tuned']:.2f}, same plan {row['same_plan']}, err {error:.1e}, "
                  f"tuning {tune_s:.0f} s) default={default.describe()} tuned={tuned.describe()}", flush=True)
    ratios = [r["default_over_tuned"] for r in rows]
    if ratios:
        print(f"default / tuned: median x{sorted(ratios)[len(ratios) // 2]:.2f}, worst x{max(ratios):.2f}, "
              f"{sum(r['same_plan'] for r in rows)} of {len(rows)} the same plan", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        body = {"device": gpu.name, "capability": gpu.capability, "torch": torch.__version__,
                "triton": triton.__version__, "python": platform.python_version(), "rows": rows}
        (Path(args.out) / "default_vs_tuned.json").write_text(json.dumps(body, indent=1))
    return 0 if all(r["default_error"] < bench.TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
