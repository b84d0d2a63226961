"""Where a QLoRA step's linear time goes, per Llama-2-7B linear shape at M = 2048 bf16 rows (4-bit GPTQ g128, rank
16 adapter): the dense floor (x @ W^T and dY @ W on a bf16 weight, cuBLAS), the checkpoint-layout dequantize kernel
alone (its GB/s against a device copy's), the dequant backend's forward and dX (dequantize + cuBLAS), the base +
adapter as one function forward + backward against the same as PEFT computes it (base, then B(A(x)) * s added), and
the Triton backend's forward + grad-input kernel (the path before the dequant backend). One JSON line per shape,
times in microseconds (median of CUDA-event-timed calls).

GPU:  python3 bench/finetune/qlora_linears.py --out $OUT/qlora_linears.jsonl
CPU:  python3 bench/finetune/qlora_linears.py --tiny --device cpu --out rows.jsonl   (checks the script; interpreter)"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))  # bench/ holds scripts, not packages: the QLoRA step bench's random layers by name

from qlora_step import gptq_factory  # noqa: E402

# (name, in_features, out_features) of one Llama-2-7B decoder layer's linears
LLAMA_7B_LINEARS = (("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 4096, 11008), ("down_proj", 11008, 4096))
TINY_LINEARS = (("tiny_square", 128, 128), ("tiny_wide", 128, 256))


def timer(device: torch.device, repeats: int):
    """call -> median microseconds: CUDA events on the GPU, perf_counter on the CPU."""

    def time_us(call) -> float:
        call()  # warm: compiles, allocates
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize(device)
                samples.append(start.elapsed_time(end) * 1e3)
            else:
                began = time.perf_counter()
                call()
                samples.append((time.perf_counter() - began) * 1e6)
        return round(statistics.median(samples), 1)

    return time_us


def copy_gbps(device: torch.device, time_us, nbytes: int = 1 << 28) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return round(2 * nbytes / time_us(lambda: dst.copy_(src)) / 1e3, 1)


def measure(name: str, k: int, n: int, m: int, rank: int, device: torch.device, dtype: torch.dtype, time_us,
            bandwidth: float) -> dict:
    from qtool.kernels.dequant_backend import GptqDequantBackend
    from qtool.kernels.gptq_dequant_triton import dequantize_into
    from qtool.kernels.low_rank_autograd import dequant_linear_plus_low_rank
    from qtool.kernels.registry import BackendRegistry
    from qtool.kernels.triton_backend import TritonBackend

    gen = torch.Generator(device=device).manual_seed(k + n)
    layer = gptq_factory(device, dtype)(k, n, gen)  # 4-bit, group size 128: the QLoRA step bench's layers
    registry = BackendRegistry(factories={"dequant": GptqDequantBackend, "triton": lambda: TritonBackend(tune=False)})
    layer.set_backend("dequant", registry)
    dequant = registry.get("dequant")
    form = layer.prepared_form(dequant)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    dy = torch.randn(m, n, device=device, generator=gen).to(dtype)
    dense = layer.dequantized_weight(dtype)  # [N, K]
    w_t = torch.empty(k, n, dtype=dtype, device=device)
    a = (torch.randn(rank, k, device=device, generator=gen) * 0.01).to(dtype).requires_grad_()
    b = (torch.randn(n, rank, device=device, generator=gen) * 0.01).to(dtype).requires_grad_()
    row = {"linear": name, "k": k, "n": n, "m": m, "rank": rank, "dtype": str(dtype).removeprefix("torch.")}
    row["dense_forward_us"] = time_us(lambda: x @ dense.T)
    row["dense_grad_input_us"] = time_us(lambda: dy @ dense)
    row["dequantize_us"] = time_us(lambda: dequantize_into(form.packed, w_t))
    moved = form.packed.qweight.nbytes + form.packed.scales.nbytes + form.packed.zeros.nbytes + w_t.nbytes
    row["dequantize_gbps"] = round(moved / row["dequantize_us"] / 1e3, 1)
    row["dequantize_vs_copy"] = round(row["dequantize_gbps"] / bandwidth, 3) if bandwidth else None
    expected = (x.double() @ dense.double().T)
    row["dequant_forward_rel_error"] = float(f"{((dequant.matmul(x, form).double() - expected).norm() / expected.norm()).item():.3g}")
    row["dequant_forward_us"] = time_us(lambda: dequant.matmul(x, form))
    row["dequant_grad_input_us"] = time_us(lambda: dequant.grad_input(dy, form))
    xg = x.detach().clone().requires_grad_()

    def fused_step():
        dequant_linear_plus_low_rank(layer, xg, a, b, 2.0).backward(dy)

    def peft_like_step():  # what PEFT's LoRA layer computes around the same base
        y = layer(xg)
        y = y + (((xg @ a.T) @ b.T) * 2.0).to(y.dtype)
        y.backward(dy)

    row["fused_lora_fwd_bwd_us"] = time_us(fused_step)
    row["peft_lora_fwd_bwd_us"] = time_us(peft_like_step)
    row["dense_fwd_bwd_floor_us"] = round(row["dense_forward_us"] + row["dense_grad_input_us"], 1)
    layer.set_backend("triton", registry)
    if layer.route(x).name == "triton":
        row["triton_forward_us"] = time_us(lambda: layer(x))
        row["triton_fwd_grad_input_us"] = time_us(lambda: layer(xg).backward(dy))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    p.add_argument("--device", default="cuda")
    p.add_argument("--m", type=int, default=None, help="rows (default 2048; 40 with --tiny)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measure (default 20; 1 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script, measures nothing")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.tiny:
        p.error("the CPU runs only --tiny (the kernels run through the Triton interpreter there)")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    time_us = timer(device, args.repeats or (1 if args.tiny else 20))
    bandwidth = copy_gbps(device, time_us, 1 << 20 if args.tiny else 1 << 28)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "copy_gbps": bandwidth, "command": " ".join(["bench/finetune/qlora_linears.py", *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, k, n in TINY_LINEARS if args.tiny else LLAMA_7B_LINEARS:
        row = env | measure(name, k, n, args.m or (40 if args.tiny else 2048), args.rank, device, dtype, time_us, bandwidth)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
