"""The EXL2 measurement pass's cost per linear, its candidates one solve each (exl2_quantize per candidate, the
pass before 91dfe38) against all of them in one batched pass (candidate_errors): torch ops dispatched (what a GPU
pays a launch for) and seconds on this device, with the errors' largest relative difference. SmolLM2-135M's linear
shapes, random weights, a Hessian from random correlated inputs; the 30 default candidates, the measurement's
p grid. On a GPU the batched pass's 32-row blocks run as one kernel each (kernels/gptq_block_triton.py), so its op
count there is lower still.

    PYTHONPATH=. python bench/quantize/measure_ops.py [--device cuda] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qtool.quant.exl2_optimize import DEFAULT_CANDIDATES
from qtool.quant.exl2_pipeline import MEASURE_P_GRID
from qtool.kernels.profiled_range import ROW_BLOCK_RANGE
from qtool.quant.exl2_solver import candidate_errors, exl2_quantize, prepare_linear

SHAPES = {"q_proj (576 x 576)": (576, 576), "k_proj (192 x 576)": (192, 576), "gate_proj (1536 x 576)": (1536, 576),
          "down_proj (576 x 1536)": (576, 1536)}


def ops_and_seconds(fn, device: torch.device) -> tuple[int, int, float, list[float]]:
    """(torch ops dispatched, the same with each GPTQ row block counted as one launch (what it is on a GPU: on the
    CPU its reference loops over the rows), seconds, the function's result)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        errors = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    top = [e for e in prof.events() if e.cpu_parent is None]
    ops = sum(1 for e in top if e.name.startswith("aten::"))
    blocks = [e for e in top if e.name == ROW_BLOCK_RANGE]
    inside = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is not None
                 and e.cpu_parent.name == ROW_BLOCK_RANGE)
    return ops + inside, ops + len(blocks), seconds, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(device)
        x = torch.randn(2048, in_features, generator=gen) * torch.linspace(0.2, 3.0, in_features)
        hessian = (2 * x.T @ x / 2048).to(device)
        prepared = prepare_linear(weight, hessian)
        layouts = [candidate.layout(in_features) for candidate in DEFAULT_CANDIDATES]

        def one_by_one():
            return [exl2_quantize(weight, hessian, bits, sizes, p_grid=MEASURE_P_GRID, prepared=prepared).error
                    for bits, sizes in layouts]

        def batched():
            return candidate_errors(prepared, weight, hessian, layouts, MEASURE_P_GRID)

        single_ops, _, single_s, single_errors = ops_and_seconds(one_by_one, device)
        batched_ops, launches, batched_s, batched_errors = ops_and_seconds(batched, device)
        worst = max(abs(a - b) / a for a, b in zip(single_errors, batched_errors) if a > 0)
        row = {"linear": name, "candidates": len(layouts), "device": str(device), "single_ops": single_ops,
               "batched_ops": batched_ops, "batched_ops_blocks_as_launches": launches, "single_s": round(single_s, 3),
               "batched_s": round(batched_s, 3), "max_relative_error_difference": worst}
        rows.append(row)
        print(f"| {name} | {single_ops} ops, {single_s:.2f} s | {batched_ops} ops ({launches} with each row block "
              f"one launch), {batched_s:.2f} s | {single_ops / launches:.0f}x fewer | errors within {worst:.1e} |",
              flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
