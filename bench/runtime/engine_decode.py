"""Batch-1 decode speed of qtool's engine (qtool.runtime.engine) on the GPU: one request with a `--context`-token
prompt, `--new-tokens` greedy tokens, decode tokens/s = (new tokens - 1) / (time after the first token). Each model
runs three ways in the same process: the decode step replayed from CUDA graphs ("graphs"), the same step eager
("eager"), and the model's modules step by step ("modules", the engine's path before the decode step). The decode
step's ways run with q/k/v and gate/up fused (the engine's default); --fusion both adds "graphs-unfused" and
"eager-unfused" rows (EngineConfig.fuse_projections=False), so one call measures what the fusion gives. --kv-cache
runs every way once per KV cache kind given (e.g. `--kv-cache auto q4`: the model's dtype, then q4, whose decode
step reads its 4-bit blocks through paged_decode_attention_q4), each at its own block size unless --block-size.

    python bench/runtime/engine_decode.py [--layers 32] [--context 512] [--new-tokens 128] [--out result.json]
    python bench/runtime/engine_decode.py --model PATH_OR_ALIAS [--dtype bfloat16]   # a real model, same table
    python bench/runtime/engine_decode.py --tiny --device cpu     # smoke test of the code path, no timing value
    python bench/runtime/engine_decode.py --fusion both --ways graphs    # fused vs unfused under CUDA graphs
    python bench/runtime/engine_decode.py --model smollm2-135m --kv-cache auto q4 --context 2048   # q4 vs float

Without --model: a Llama-2-7B-shaped HF LlamaForCausalLM with random weights (no download), first in bf16, then
with every decoder linear replaced by a random 4-bit g128 GPTQ QuantLinear (bench/runtime/decode.py's
random_quant_linear) served by --backend. Each way runs --repeats requests on a freshly started engine (start-up
warms up and captures; the first request's rate shows that nothing is tuned inside it); the table gives the first
request's rate and the median of all.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode.py beside this file: its random GPTQ linears
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the modules every bench script shares
from decode import random_quant_linear  # noqa: E402
from run_metadata import run_metadata  # noqa: E402

from qtool.kernels.quant_linear import set_model_backend  # noqa: E402
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from qtool.runtime.kv_cache_names import KV_CACHE_KINDS, default_block_size  # noqa: E402

WAYS = {"graphs": dict(fast_decode=True, cuda_graphs=True), "eager": dict(fast_decode=True, cuda_graphs=False),
        "modules": dict(fast_decode=False, cuda_graphs=False)}
UNFUSED = "-unfused"  # a decode-step way with each layer's q/k/v and gate/up as separate linears
FUSIONS = ("on", "off", "both")


def way_settings(way: str) -> dict:
    """EngineConfig settings of a way: one of WAYS, or a decode-step way + UNFUSED."""
    base = way.removesuffix(UNFUSED)
    return {**WAYS[base], "fuse_projections": not way.endswith(UNFUSED)}


def ways_with_fusion(ways: list[str], fusion: str) -> list[str]:
    """The ways to run for --fusion: as given (on), their decode-step ways unfused (off), or both, each unfused
    way right after its fused one; "modules" has no decode step to fuse and runs once."""
    chosen = []
    for way in ways:
        stepped = WAYS[way]["fast_decode"]
        if fusion in ("on", "both") or not stepped:
            chosen.append(way)
        if fusion in ("off", "both") and stepped:
            chosen.append(way + UNFUSED)
    return chosen
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_llama(shape: dict, layers: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape))
    return model.eval()


def quantize_randomly(model: nn.Module, bits: int, group_size: int, backend: str, seed: int) -> dict:
    """Every nn.Linear of the decoder layers replaced by a random GPTQ QuantLinear (the float weights freed)."""
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = model.model.layers
    for name, module in list(layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attribute = name.rpartition(".")
            setattr(layers.get_submodule(parent), attribute,
                    random_quant_linear(module.in_features, module.out_features, bits, group_size, generator, device))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return set_model_backend(model, backend)


def measure(model: nn.Module, way: str, args, vocab: int, kv_cache: str = "auto") -> dict:
    """Start an engine the given way with that KV cache kind, run --repeats single requests; rates and start-up
    time."""
    block_size = args.block_size or default_block_size(kv_cache)
    blocks = -(-(args.context + args.new_tokens) // block_size) + 2
    began = time.perf_counter()
    engine = Engine(model, None, EngineConfig(block_size=block_size, num_blocks=blocks, max_num_seqs=1,
                                              max_num_batched_tokens=args.prefill_chunk, kv_cache=kv_cache,
                                              **way_settings(way)))
    if model.model.embed_tokens.weight.is_cuda:
        torch.cuda.synchronize()
    start_s = time.perf_counter() - began
    generator = torch.Generator().manual_seed(args.seed)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    rates, ttfts = [], []
    for _ in range(args.repeats):
        prompt = torch.randint(3, vocab, (args.context,), generator=generator).tolist()
        out = engine.generate(prompt, params)[0]
        decode_s = out.seconds - out.time_to_first_token_s
        rates.append((len(out.token_ids) - 1) / decode_s)
        ttfts.append(out.time_to_first_token_s)
    result = {"way": way, "kv_cache": kv_cache, "block_size": block_size, "engine_start_s": round(start_s, 2),
              "decode_tok_s": [round(r, 1) for r in rates],
              "first_request_tok_s": round(rates[0], 1), "median_tok_s": round(statistics.median(rates), 1),
              "ttft_s": [round(t, 4) for t in ttfts], "decode_path": engine.runner.decode_step_reason,
              "graphs_captured": sorted(engine.runner.decode_graphs.graphs) if engine.runner.decode_graphs else []}
    del engine
    gc.collect()
    if model.model.embed_tokens.weight.is_cuda:
        torch.cuda.empty_cache()
    return result


def run_model(label: str, model: nn.Module, args, vocab: int, report: dict) -> None:
    for kv_cache in args.kv_cache:
        for way in ways_with_fusion(args.ways, args.fusion):
            row = {"model": label, **measure(model, way, args, vocab, kv_cache)}
            print(f"  {label:<10} {way:<15} kv {kv_cache:<5} first {row['first_request_tok_s']:>8.1f} tok/s   median "
                  f"{row['median_tok_s']:>8.1f} tok/s   start {row['engine_start_s']:>6.1f} s", flush=True)
            report["rows"].append(row)
            write(report, args.out)  # after every row: a run cut short keeps what it measured


def write(report: dict, out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model path or alias (qtool's loader) instead of the random 7B shape")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of --model (float16, bfloat16, float32)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--backend", default="triton", help="backend of the 4-bit linears (auto, torch, triton)")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-chunk", type=int, default=16,
                        help="tokens per engine step (max_num_batched_tokens): the engine's start tunes the 4-bit "
                             "linears at every power of two up to it, so a small one keeps the start short")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV cache block (default: each kind's own, 64 for q4, else 16)")
    parser.add_argument("--kv-cache", nargs="+", default=["auto"], choices=KV_CACHE_KINDS,
                        help="KV cache kinds, each a run of every way (auto: the model's dtype)")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--fusion", default="on", choices=FUSIONS,
                        help="the decode step's q/k/v and gate/up fused (on, the engine's default), separate (off), "
                             "or both, each way's unfused row right after its fused one")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke test on CPU")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/runtime/engine_decode.py needs CUDA (or --tiny --device cpu)", file=sys.stderr)
        return 2
    report = {**run_metadata(device, __file__, sys.argv[1:] if argv is None else list(argv)),
              "context": args.context, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "prefill_chunk": args.prefill_chunk, "rows": []}
    print(f"engine batch-1 decode, {args.context}-token context, {args.new_tokens} new tokens, on {report['device']}")
    if args.model:
        from qtool.checkpoints.sources import load_model

        loaded = load_model(args.model, device=str(device), dtype=args.dtype, with_tokenizer=False,
                            backend=args.backend)
        report["model"] = args.model
        run_model(Path(args.model).name[:10], loaded.model.eval(), args, loaded.model.config.vocab_size, report)
    else:
        shape = TINY if args.tiny else LLAMA2_7B
        layers = 2 if args.tiny else args.layers
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        report["model"] = f"random Llama-2-7B shape, {layers} layers" if not args.tiny else "random tiny llama"
        model = random_llama(shape, layers, dtype, device, args.seed)
        run_model(str(dtype).replace("torch.", ""), model, args, shape["vocab_size"], report)
        report["backend_layers"] = quantize_randomly(model, args.bits, args.group_size, args.backend, args.seed)
        run_model(f"gptq-{args.bits}bit", model, args, shape["vocab_size"], report)
    print(f"\n{'model':<12}{'way':<16}{'kv cache':<10}{'first tok/s':>12}{'median tok/s':>14}{'start s':>9}")
    for row in report["rows"]:
        print(f"{row['model']:<12}{row['way']:<16}{row['kv_cache']:<10}{row['first_request_tok_s']:>12.1f}"
              f"{row['median_tok_s']:>14.1f}{row['engine_start_s']:>9.1f}")
    write(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
