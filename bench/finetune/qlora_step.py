"""QLoRA training-step speed and memory on a Llama-2-7B-shaped model with random weights: tokens/s and peak GPU
memory of a LoRA step (rank 16, every decoder linear targeted, gradient checkpointing, AdamW on the adapters) for

  qtool-dequant  the decoder linears as qtool GPTQ 4-bit g128 QuantLinear on the dequant backend, what `qtool
                 finetune` trains through (finetune.quantized_lora.use_training_backend): each weight dequantized
                 from the checkpoint's layout into one shared scratch, then cuBLAS, forward and dX; base matmul and
                 adapter in one autograd function; one packed copy of the weights
  qtool-fused    qtool-dequant's base and adapters trained through qtool's fused forward (what `qtool finetune` runs
                 on CUDA: finetune.fused_forward): fused RMSNorm + residual, RoPE, SiLU * up and chunked head + cross
                 entropy, each decoder layer a checkpointed segment
  qtool-triton   the decoder linears as qtool GPTQ 4-bit g128 QuantLinear, forward on the Triton backend, backward
                 through the grad-input kernel (qtool.finetune.quantized_lora + PEFT)
  qtool-torch    the same GPTQ base through qtool's torch path: each weight dequantized per call, forward and
                 backward (transformers + PEFT over the reference path)
  bnb-nf4        transformers + PEFT + bitsandbytes 4-bit (NF4, double quantization, bf16 compute) QLoRA; bitsandbytes
                 is imported only here, and a missing one is a row that says so

Every system: the same shapes, bf16 base (embeddings, norms, head), LoRA A/B in --lora-dtype, batch 1 x --seqlen
tokens of random ids (labels = ids), --warmup untimed steps, then --steps timed ones. Peak memory is
torch.cuda.max_memory_allocated over the timed steps (weights included). One JSON line per system to --out, then
one comparison line (ours' speed and peak memory as ratios of each other system's, and its first loss
minus qtool-torch's on the same base), each with the device, versions and command. "Ours" is --ours (qtool-fused).
--profile OUT.json: one more step of each system under torch.profiler, summarized by step_profile.py (kernel time by
category: dequant, base/LoRA GEMMs, attention, elementwise, casts/copies, loss, optimizer, other; the top 20 kernels;
the device's idle gaps, where it waited on the host; the allocator's allocations in the step), printed as a table.

GPU:  python3 bench/finetune/qlora_step.py --out $OUT/qlora_step.jsonl
      (bitsandbytes from a carried wheel: pip install --no-deps --target /tmp/bnb_site .whl/finetune/*.whl and
      PYTHONPATH=/tmp/bnb_site)
CPU:  python3 bench/finetune/qlora_step.py --tiny --device cpu --out rows.jsonl   (a tiny llama, for tests)"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the package is the repo's qtool/ folder; no install needed
sys.path.insert(0, str(HERE.parent))  # bench/ holds scripts, not packages: its shared modules import by name
sys.path.insert(0, str(HERE))  # and so does bench/finetune/ (step_profile.py)

from run_metadata import run_metadata  # noqa: E402

SYSTEMS = ("qtool-fused", "qtool-dequant", "qtool-triton", "qtool-torch", "bnb-nf4")
QTOOL_BACKENDS = {"qtool-fused": "dequant", "qtool-dequant": "dequant", "qtool-triton": "triton", "qtool-torch": "torch"}
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- the model: a llama skeleton whose decoder linears each system fills in its own way ----


def llama_skeleton(shape: dict, device: torch.device, dtype: torch.dtype, linear_factory) -> nn.Module:
    """A LlamaForCausalLM built on the meta device (no 7B float weights ever exist), each decoder linear replaced by
    linear_factory(in_features, out_features, generator) on `device`, the rest materialized there with random
    values (normal 0.02 embeddings and head, unit norms) and the rotary tables rebuilt."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, linear_factory(child.in_features, child.out_features, gen))
    # what is still on meta: embeddings, norms, head, rotary buffers
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                value = torch.empty(param.shape, device=device, dtype=dtype)
                if param.dim() == 1:
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, 0.02, generator=gen)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    with device:
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model


def gptq_factory(device: torch.device, dtype: torch.dtype, bits: int = 4, group_size: int = 128):
    """QuantLinear with random codes, asymmetric zeros and scales giving weights of about 0.015 rms."""
    from qtool.kernels.quant_linear import QuantLinear

    def build(in_features: int, out_features: int, gen: torch.Generator) -> nn.Module:
        layer = QuantLinear(in_features, out_features, bits, group_size, device=device)
        full = torch.iinfo(torch.int32)
        layer.qweight.random_(full.min, full.max, generator=gen)
        layer.qzeros.random_(full.min, full.max, generator=gen)
        layer.scales.uniform_(0.002, 0.006, generator=gen)
        layer.g_idx.copy_(torch.arange(in_features, device=device) // group_size)
        return layer

    return build


def bnb_factory(device: torch.device, dtype: torch.dtype):
    """bitsandbytes Linear4bit (NF4, double quantization, `dtype` compute) from a random normal 0.02 weight,
    quantized as it moves to the device."""
    import bitsandbytes as bnb

    def build(in_features: int, out_features: int, gen: torch.Generator) -> nn.Module:
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu() if device.type == "cuda" else weight, requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
        return layer.to(device)

    return build


def build_system(system: str, shape: dict, device: torch.device, dtype: torch.dtype, rank: int, lora_dtype: str):
    """(PEFT model ready to train, LoRA parameters)."""
    from peft import LoraConfig, get_peft_model

    if system == "bnb-nf4":
        model = llama_skeleton(shape, device, dtype, bnb_factory(device, dtype))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(DECODER_LINEARS),
                            bias="none", task_type="CAUSAL_LM")
    else:
        from qtool.finetune.quantized_lora import lora_config_for
        from qtool.kernels.quant_linear import set_model_backend

        model = llama_skeleton(shape, device, dtype, gptq_factory(device, dtype))
        set_model_backend(model, QTOOL_BACKENDS[system])
        config = lora_config_for(model, rank, 2 * rank, 0.0, "all-linear", lora_dtype=lora_dtype)
    # the adapters in lora_dtype in every system (PEFT would upcast bfloat16 ones to float32 by default)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(getattr(torch, lora_dtype))
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.enable_input_require_grads()
    peft_model.config.use_cache = False
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(system: str, args: argparse.Namespace, device: torch.device, profiles: dict | None = None) -> dict:
    """The system's row; with args.profile, its profile summary put into profiles[system]."""
    shape = TINY if args.tiny else LLAMA_7B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    row = {"system": system, "seqlen": args.seqlen, "rank": args.rank, "lora_dtype": args.lora_dtype,
           "shape": "tiny llama" if args.tiny else "llama-2-7b", "bits": 4, "group_size": 128, "tiny": args.tiny,
           "gradient_checkpointing": True}
    if system == "bnb-nf4":
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # absent, or no build for this machine: the row says so
            return row | {"skipped": f"bitsandbytes could not be imported ({type(exc).__name__}: {exc})"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)  # PEFT draws the A matrices from the global generator
    started = time.perf_counter()
    model, params = build_system(system, shape, device, dtype, args.rank, args.lora_dtype)
    row["build_s"] = round(time.perf_counter() - started, 2)
    if device.type == "cuda":
        row["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
    if QTOOL_BACKENDS.get(system) == "dequant":
        from qtool.kernels.registry import default_registry

        # the one dequantized weight every layer shares (sized for the largest linear at set_backend)
        row["scratch_mib"] = round(default_registry().get("dequant").scratch.nbytes(device) / 2**20, 1)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, shape["vocab_size"], (1, args.seqlen), device=device, generator=gen)
    losses = []

    fused = None
    if system == "qtool-fused":
        from qtool.finetune.fused_forward import plan_fused_forward

        fused, row["forward"] = plan_fused_forward(model)
        if fused is None:
            return row | {"skipped": f"the fused forward does not take the model: {row['forward']}"}
    positions = torch.arange(args.seqlen, device=device).unsqueeze(0)

    def step():
        if fused is None:
            loss = model(input_ids=tokens, labels=tokens).loss
        else:  # the mean over the predicted tokens, as transformers' loss
            loss = fused.summed_token_loss(tokens, positions, tokens, -100) / (args.seqlen - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().item())

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - started
    row |= {"steps": args.steps, "step_s": round(elapsed / args.steps, 4),
            "tokens_per_s": round(args.steps * args.seqlen / elapsed, 1), "losses": [round(x, 4) for x in losses],
            "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if args.profile and profiles is not None:
        profiles[system] = profile_step(step, system, device, args.rank)
        # the profiler's own host cost lengthens the profiled step: its gaps overstate an unprofiled step's
        profiles[system]["unprofiled_step_us"] = round(row["step_s"] * 1e6, 1)
        row["profile_busy_share"] = profiles[system]["busy_share"]
    return row


def profile_step(step, system: str, device: torch.device, rank: int) -> dict:
    """One more step under torch.profiler (shapes recorded), summarized by step_profile.summarize: kernel time by
    category, the top kernels, the device's idle gaps; on a GPU also the caching allocator's allocations in the
    step (count and bytes). Printed as a table."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from step_profile import STEP_RANGE, format_table, step_events, summarize

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    before = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    with profile(activities=activities, record_shapes=True) as prof:
        with record_function(STEP_RANGE):
            step()
            synchronize(device)
    summary = summarize(step_events(prof, device.type), rank)
    if device.type == "cuda":
        after = torch.cuda.memory_stats(device)
        summary["allocations"] = after["allocation.all.allocated"] - before["allocation.all.allocated"]
        summary["allocated_gib"] = round((after["allocated_bytes.all.allocated"]
                                          - before["allocated_bytes.all.allocated"]) / 2**30, 3)
    print(format_table(system, summary), flush=True)
    return summary


def comparison(rows: list[dict], ours_name: str = "qtool-fused") -> dict:
    """`ours_name`'s tokens/s and peak memory as ratios of each other measured system's."""
    by_system = {row["system"]: row for row in rows if "tokens_per_s" in row}
    ours = by_system.get(ours_name)
    result = {"system": "comparison", "ours": ours_name}
    if ours is None:
        return result | {"skipped": f"{ours_name} was not measured"}
    for name, other in by_system.items():
        if name == ours_name:
            continue
        result[f"speed_vs_{name}"] = float(f"{ours['tokens_per_s'] / other['tokens_per_s']:.4g}")  # 4 significant digits: ratios far below 1 too
        if "peak_gib" in ours and "peak_gib" in other:
            result[f"memory_vs_{name}"] = float(f"{ours['peak_gib'] / other['peak_gib']:.4g}")
    if "qtool-torch" in by_system and ours_name != "qtool-torch":
        # the same GPTQ base and adapters: the first losses differ only by the kernels' rounding
        result["first_loss_vs_qtool-torch"] = round(ours["losses"][0] - by_system["qtool-torch"]["losses"][0], 5)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    p.add_argument("--device", default="cuda")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per step (default 2048; 32 with --tiny)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny llama: checks the script, measures nothing")
    p.add_argument("--ours", choices=SYSTEMS, default="qtool-fused", help="the system the comparison line is about")
    p.add_argument("--profile", type=Path, metavar="OUT.json",
                   help="profile one more step of each system: kernel time by category, top kernels, idle gaps (JSON)")
    args = p.parse_args(argv)
    args.seqlen = args.seqlen or (32 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 5)
    if args.tiny:
        args.warmup = min(args.warmup, 1)
    unknown = [s for s in args.systems.split(",") if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)}; use {', '.join(SYSTEMS)}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    env = run_metadata(device, __file__, argv, libraries=("transformers", "peft"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    profiles: dict[str, dict] = {}

    def record(row: dict) -> None:
        # one line at a time: a run cut off by its time limit keeps the systems it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as out:
            out.write(json.dumps(env | row) + "\n")

    for system in args.systems.split(","):
        try:
            row = measure(system, args, device, profiles)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"system": system, "error": f"out of memory: {str(exc).splitlines()[0]}"}
        gc.collect()  # the system's model and optimizer state went out of scope with measure()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record(row)
        if args.profile:  # rewritten after each system: a run cut off keeps the profiles it took
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            args.profile.write_text(json.dumps(env | {"rank": args.rank, "seqlen": args.seqlen, "systems": profiles},
                                               indent=1) + "\n")
    record(comparison(rows, args.ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
