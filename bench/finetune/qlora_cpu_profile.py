"""Where one QLoRA training step on the CPU spends its time: a GPTQ base with LoRA on every decoder linear (qtool's
torch path: each packed weight dequantized in the forward and again in the backward's dX = dY @ W), one step of
--tokens tokens (rows of --seqlen random ids, labels = ids, AdamW on the adapters), timed forward / backward /
optimizer over --steps steps after one untimed one, then

  dequant_seconds   dequantizing every quantized linear once, as the torch path does twice a step;
  top_ops           the step's operators by self CPU time (torch.profiler), the largest first.

Run it with one thread to read the profile of the single-core case (the VM is shared):

    OMP_NUM_THREADS=1 python bench/finetune/qlora_cpu_profile.py --base out/smollm2-gptq-4bit --json OUT.json
    python bench/finetune/qlora_cpu_profile.py --tiny      # a tiny random llama, RTN-quantized: the script runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # bench/ holds scripts, not packages: its shared modules import by name

from qtool.config.finetune_schema import FinetuneConfig  # noqa: E402
from qtool.finetune.job import prepare_model  # noqa: E402
from qtool.kernels.quant_linear import QuantLinear  # noqa: E402
from run_metadata import print_and_save  # noqa: E402

TOP_OPS = 12


def tiny_gptq_llama() -> nn.Module:
    """tests/conftest.py's tiny llama with every decoder linear RTN-quantized to 4-bit GPTQ, group size 64."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_llama

    from qtool.quant.rtn import rtn_quantize

    model = build_tiny_llama()
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            quantized = rtn_quantize(module.weight.detach(), 4, 64, sym=False).quantized
            parent, _, attribute = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), attribute, QuantLinear.from_quantized(quantized))
    return model


def dequantize_all(model: nn.Module) -> float:
    """Seconds to dequantize every QuantLinear of the model once, in float32."""
    started = time.perf_counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.dequantized_weight(torch.float32)
    return time.perf_counter() - started


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float, float]:
    """(forward, backward, optimizer) seconds of one step on ids [rows, seqlen]."""
    started = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return forward - started, backward - forward, time.perf_counter() - backward


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="out/smollm2-gptq-4bit", help="a GPTQ model directory")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one untimed)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random GPTQ llama: checks the script runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.tiny:
        model, args.tokens, args.seqlen, args.base = tiny_gptq_llama(), 64, 32, "tiny random llama (RTN 4-bit g64)"
    else:
        from qtool.checkpoints.sources import load_model

        model = load_model(args.base, device="cpu").model
    settings = FinetuneConfig(method="qlora", rank=args.rank, alpha=2 * args.rank, seqlen=args.seqlen, batch_tokens=args.tokens)
    model = prepare_model(model, settings).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = max(1, args.tokens // args.seqlen)
    ids = torch.randint(0, model.config.vocab_size, (rows, args.seqlen), generator=torch.Generator().manual_seed(0))
    one_step(model, optimizer, ids)
    times = [one_step(model, optimizer, ids) for _ in range(args.steps)]
    forward, backward, update = (min(column) for column in zip(*times))
    dequant = min(dequantize_all(model) for _ in range(args.steps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(model, optimizer, ids)
    ops = sorted(prof.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)[:TOP_OPS]
    step = forward + backward + update
    figures = {
        "base": args.base, "threads": torch.get_num_threads(), "tokens": rows * args.seqlen, "seqlen": args.seqlen,
        "rank": args.rank, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantized_linears": sum(isinstance(m, QuantLinear) for m in model.modules()),
        "forward_seconds": forward, "backward_seconds": backward, "optimizer_seconds": update, "step_seconds": step,
        "tokens_per_second": rows * args.seqlen / step, "dequant_seconds": dequant, "dequant_share_of_step": 2 * dequant / step,
        "top_ops": [{"op": op.key, "self_seconds": op.self_cpu_time_total / 1e6, "calls": op.count} for op in ops],
    }
    print_and_save(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
