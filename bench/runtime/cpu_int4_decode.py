"""Batch-1 decode on the CPU: one token's forward of a GPTQ 4-bit model through the cpu-int4 backend (torch's CPU
int4 kernel), the torch reference backend (dequantize every call), and the float model it came from, interleaved in
one process so that load on the machine hits all three alike; plus the tokens/s of `generate` for each.

    PYTHONPATH=. python bench/runtime/cpu_int4_decode.py GPTQ_DIR [--float smollm2-135m] [--repeats 5] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from qtool.checkpoints.sources import load_model
from qtool.kernels.quant_linear import set_model_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ holds scripts, not packages: shared modules by name
from run_metadata import git_commit  # noqa: E402


def token_forward_seconds(model, context: int, repeats: int) -> float:
    """Median seconds of one decode step (one new token over a `context`-token KV cache)."""
    ids = torch.randint(10, 1000, (1, context + 1))
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            out = model(ids[:, :context], use_cache=True)
            begin = time.perf_counter()
            model(ids[:, context:], past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gptq_dir")
    parser.add_argument("--float", default="smollm2-135m", help="the float model the checkpoint came from")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the three models")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared machine, where "
                        "OpenMP's barriers stall each matmul for milliseconds")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quantized = load_model(args.gptq_dir, device="cpu").model
    reference = load_model(args.float, device="cpu").model
    rows: dict[str, list[float]] = {"cpu-int4": [], "torch": [], "float": []}
    for _ in range(args.rounds):
        for name in ("cpu-int4", "torch"):
            set_model_backend(quantized, name)
            rows[name].append(token_forward_seconds(quantized, args.context, args.repeats))
        rows["float"].append(token_forward_seconds(reference, args.context, args.repeats))
    medians = {name: statistics.median(values) for name, values in rows.items()}
    result = {
        "bench": "cpu_int4_decode", "date": date.today().isoformat(), "commit": git_commit(short=True),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": args.gptq_dir, "context": args.context,
        "seconds_per_token": medians,
        "cpu_int4_vs_torch": medians["torch"] / medians["cpu-int4"],
        "cpu_int4_vs_float": medians["float"] / medians["cpu-int4"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
