"""The engine's host time per step, by phase: a decode loop whose forward costs next to nothing (a tiny random Llama:
2 layers, hidden 64, a vocabulary of 512: --vocab 49152 is SmolLM2's), so what is measured is the scheduler, the
inputs built per step, the sampler, the syncs, postprocessing and detokenizing. On the CPU the phases are timed in
this thread's CPU time (a shared machine's load stays out; one torch thread runs every op here), on CUDA in wall
time. TTFT and tok/s are wall time.

    python bench/runtime/engine_overhead.py                          # CPU, 1 thread, both decode paths
    python bench/runtime/engine_overhead.py --stream                 # with a tokenizer and on_text streaming
    python bench/runtime/engine_overhead.py --tiny                   # a few tokens: the code path, no timing value
    python bench/runtime/engine_overhead.py --device cuda --sync-phases   # on a GPU: each phase owns its GPU time
    python bench/runtime/engine_overhead.py --device cuda --model DIR --kernel-profile   # a real model (HF or GPTQ
        directory, e.g. runtime_bench.py's --work/smollm2-gptq-4bit): its phases and the GPU kernels of a decode step

Each path ("decode-step": the whole-tensor decode step, on CUDA replayed from CUDA graphs, the GPU's path; "modules":
the model's modules) runs on a freshly constructed engine: the first request's TTFT (anything compiled, tuned or
captured inside a request shows there), then --requests timed requests of --new-tokens greedy tokens at --batch
requests at once. Phases (Engine.record_phases, qtool/runtime/engine/step_phases.py): schedule, prepare (input tensors),
forward (on CUDA: queued, its GPU time goes to sample unless --sync-phases), sample (finite check, sampler, the
device->host copy of the ids), postprocess (sequence updates, stop checks, detokenizing, stream callbacks). Each
phase's figure is its median over the decode steps (the sum of the medians, and the mean step, in the total column).
The last column counts the torch operators a prefill step and a decode step dispatch from Python (each about one
kernel launch on a GPU; on CUDA with graphs the decode step's forward is one replay; on the CPU the decode step's
fused ops run their torch references, several operators each): exact where timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
from qtool.runtime.engine.step_phases import PHASES, StepPhases

PATHS = {"decode-step": dict(fast_decode=True), "modules": dict(fast_decode=False)}
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True)
GRIMM = Path("/work/shared/data/grimm/train.txt")


def tiny_model(vocab: int, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **SHAPE))
    return model.to(device).eval()


def trained_tokenizer(vocab: int, text_file: Path):
    """A byte-level BPE trained on a text (English prose): decoding costs what a real tokenizer's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = text_file.read_text() if text_file.is_file() else "once upon a time there lived a king " * 200
    backend.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def kernel_profile(engine: Engine, params: SamplingParams, prompt: list[int], steps: int) -> list[dict]:
    """The GPU kernels of `steps` decode steps (torch.profiler): per kernel name, launches and microseconds per
    step, most time first. Where the decode step's GPU time goes (and why float may be slower than GPTQ)."""
    from torch.profiler import ProfilerActivity, profile

    engine.add_request(prompt, params)
    engine.step()  # the prefill
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and getattr(getattr(event, "device_type", None), "name", "") == "CUDA":
            rows.append({"kernel": event.key[:90], "launches_per_step": event.count / steps,
                         "us_per_step": device_us / steps})
    return sorted(rows, key=lambda row: -row["us_per_step"])


def top_level_ops(steps) -> float:
    """torch operators the steps dispatched from Python (not those an operator calls inside itself): on a GPU,
    about one kernel launch each, the host's cost the CPU run can count exactly while its timings are noisy."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        count = steps()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")) / count


def op_counts(engine: Engine, params: SamplingParams, prompt: list[int], decode_steps: int) -> dict:
    """Torch operators per prefill step (one request of `prompt`) and per decode step."""
    engine.add_request(prompt, params)
    prefill = top_level_ops(lambda: (engine.step(), 1)[1])

    def decode() -> int:
        for _ in range(decode_steps):
            engine.step()
        return decode_steps

    per_decode = top_level_ops(decode)
    while engine.has_unfinished():
        engine.step()
    return {"prefill_step": prefill, "decode_step": per_decode}


def run_path(name: str, model, tokenizer, args: argparse.Namespace, device: torch.device) -> dict:
    fast_prefill = {"fast_prefill": args.fast_prefill == "on"} if args.fast_prefill else {}  # else the default
    config = EngineConfig(num_blocks=args.num_blocks, max_num_seqs=max(8, args.batch),
                          cuda_graphs=not args.no_cuda_graphs,
                          **PATHS[name], **fast_prefill)
    began = time.perf_counter()
    engine = Engine(model, tokenizer, config)
    start_s = time.perf_counter() - began
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 3 + args.prompt_tokens))
    pieces: list[str] = []
    on_text = pieces.append if args.stream else None

    first_step_cpu_ms: list[float] = []

    def request_batch(first_token: int) -> list:
        prompts = [[(t + first_token + row * 7) % model.config.vocab_size for t in prompt] for row in range(args.batch)]
        began = time.thread_time_ns()  # CPU time: a loaded machine's waits stay out of it
        ids = [engine.add_request(p, params, on_text=on_text) for p in prompts]
        done = {output.request_id: output for output in engine.step()}  # the prompts' prefill and first tokens
        synchronize(device)
        first_step_cpu_ms.append((time.thread_time_ns() - began) / 1e6)
        while engine.has_unfinished():
            for output in engine.step():
                done[output.request_id] = output
        return [done[i] for i in ids]

    first = request_batch(0)[0]  # a fresh engine's first request: nothing may compile or tune inside it
    phases = StepPhases(synchronize=args.sync_phases, clock="thread" if device.type == "cpu" else "wall")
    engine.record_phases(phases)
    walls, ttfts, decode_rates = [], [], []
    for index in range(args.requests):
        began = time.perf_counter()
        outputs = request_batch(100 + index)
        walls.append(time.perf_counter() - began)
        ttfts += [o.time_to_first_token_s for o in outputs]
        decode_rates += [(len(o.token_ids) - 1) / (o.seconds - o.time_to_first_token_s) for o in outputs]
    engine.record_phases(None)  # the profiles below are no timed steps
    tokens = args.batch * args.new_tokens
    kernels = None
    if args.kernel_profile:
        try:
            kernels = kernel_profile(engine, params, prompt, min(16, args.new_tokens - 2))
        except Exception as exc:  # the profiler's API moves between torch versions: the other figures still count
            kernels = [{"kernel": f"profile failed: {type(exc).__name__}: {exc}"[:200], "launches_per_step": 0,
                        "us_per_step": 0.0}]
    ops = op_counts(engine, params, prompt, min(16, args.new_tokens - 2))
    return {
        "torch_ops_per_step": ops,
        "kernels": kernels,
        "path": name, "engine_start_s": start_s, "fast_decode_steps": engine.runner.fast_decode_steps,
        "fast_prefill_steps": getattr(engine.runner, "fast_prefill_steps", None),
        "decode_step": engine.runner.decode_step_reason,
        "first_request_ttft_ms": first.time_to_first_token_s * 1e3,
        "first_request_first_step_cpu_ms": first_step_cpu_ms[0],
        "first_step_cpu_ms_median": statistics.median(first_step_cpu_ms[1:]),
        "ttft_ms_median": statistics.median(ttfts) * 1e3,
        "decode_us_per_step": phases.per_step_us("decode"), "decode_steps": phases.steps("decode"),
        "decode_us_per_step_mean": phases.per_step_us("decode", "mean"),
        "other_us_per_step": phases.per_step_us("other"), "other_steps": phases.steps("other"),
        "tok_s": tokens * len(walls) / sum(walls), "decode_tok_s_per_request": statistics.median(decode_rates),
        "streamed_chars": sum(map(len, pieces)),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(results: list[dict]) -> str:
    head = ("| path | " + " | ".join(PHASES) + " | sum (mean) µs/decode step | prefill step µs | first step CPU ms: first "
            "request / later | TTFT wall ms: first / later | tok/s | torch ops per prefill / decode step |")
    lines = [head, "|" + "---|" * (len(PHASES) + 8)]
    for r in results:
        d = r["decode_us_per_step"]
        lines.append(f"| {r['path']} | " + " | ".join(f"{d[p]:.0f}" for p in PHASES) + f" | {d['total']:.0f} ({r['decode_us_per_step_mean']['total']:.0f}) | "
                     f"{r['other_us_per_step']['total']:.0f} | {r['first_request_first_step_cpu_ms']:.2f} / "
                     f"{r['first_step_cpu_ms_median']:.2f} | {r['first_request_ttft_ms']:.1f} / "
                     f"{r['ttft_ms_median']:.1f} | {r['tok_s']:.0f} | {r['torch_ops_per_step']['prefill_step']:.0f} / "
                     f"{r['torch_ops_per_step']['decode_step']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: the host's share)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5, help="timed requests (batches) per path, at least 2")
    parser.add_argument("--batch", type=int, default=1, help="requests at once")
    parser.add_argument("--vocab", type=int, default=512, help="the model's vocabulary (SmolLM2's: 49152)")
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--stream", action="store_true", help="a tokenizer and on_text callbacks (qtool run's way)")
    parser.add_argument("--sync-phases", action="store_true", help="CUDA: wait for the device at every phase mark")
    parser.add_argument("--path", choices=tuple(PATHS), action="append", help="only these paths (default: both)")
    parser.add_argument("--tiny", action="store_true", help="a few tokens, a small vocabulary: a smoke run")
    parser.add_argument("--model", help="a model directory or alias instead of the tiny random one (its tokenizer "
                        "streams with --stream)")
    parser.add_argument("--dtype", default="bfloat16", help="--model's float dtype on CUDA")
    parser.add_argument("--fast-prefill", choices=("on", "off"), default=None,
                        help="prefill steps through the decode step's fused ops (on) or the model's modules (off); "
                        "default: the engine's")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: the decode step eager (its kernels "
                        "one by one, for --kernel-profile where the profiler does not see inside graphs)")
    parser.add_argument("--kernel-profile", action="store_true", help="CUDA: the GPU kernels of a decode step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the results as one JSON line")
    args = parser.parse_args(argv)
    if args.tiny:
        args.new_tokens, args.requests, args.vocab = min(args.new_tokens, 8), 2, min(args.vocab, 512)
    args.requests = max(args.requests, 2)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.kernel_profile and device.type != "cuda":
        parser.error("--kernel-profile needs --device cuda")
    tokenizer = None
    if args.model:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_models  # beside this file: qtool's loader, GPTQ directories with their Triton linears

        dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
        model, loaded_tokenizer = bench_models.load(args.model, device, dtype)
        tokenizer = loaded_tokenizer if args.stream else None
        args.vocab = model.config.vocab_size
    else:
        if args.stream:
            tokenizer = trained_tokenizer(args.vocab, GRIMM)
            args.vocab = len(tokenizer)  # a small corpus may yield fewer merges than asked
        model = tiny_model(args.vocab, device, args.seed)
    results = [run_path(name, model, tokenizer, args, device) for name in (args.path or PATHS)]
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, vocab {args.vocab}, batch {args.batch}, "
          f"{args.new_tokens} new tokens x {args.requests} requests, stream {args.stream}, sync {args.sync_phases}")
    print(table(results))
    for r in results:
        print(f"{r['path']}: {r['decode_step']}; engine start {r['engine_start_s']:.2f} s")
        if r["kernels"] is not None:
            total = sum(k["us_per_step"] for k in r["kernels"])
            launches = sum(k["launches_per_step"] for k in r["kernels"])
            print(f"  GPU kernels per decode step: {launches:.0f} launches, {total:.0f} µs; the most time (none listed: "
                  "the profiler saw no kernel, e.g. inside CUDA graphs: rerun with --no-cuda-graphs)" if not r["kernels"] else
                  f"  GPU kernels per decode step: {launches:.0f} launches, {total:.0f} µs; the most time:")
            for k in r["kernels"][:15]:
                print(f"    {k['us_per_step']:8.1f} µs  {k['launches_per_step']:5.1f}x  {k['kernel']}")
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
