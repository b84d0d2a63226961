"""Issue 23's CPU goal: `qtool run` (the engine, as run builds it) against transformers' generate on the same loaded
model, batch 1, greedy, the same chat prompt and the same number of new tokens (end of sequence ignored by both),
SmolLM2 GPTQ 4-bit and float32. Rounds interleave the systems (each round rotates their order) so that load from
other jobs on a shared machine hits them alike; medians and ranges over the rounds, of tokens/s and of this
process's CPU time per token (which that load moves less), and the per-round ratios to generate.

    PYTHONPATH=. python bench/runtime/cpu_run_vs_generate.py [--gptq out/smollm2-gptq-4bit] [--float smollm2-135m]
        [--threads 1] [--new-tokens 64] [--rounds 5] [--modules-too] [--out FILE.jsonl] [--profile 16]
    PYTHONPATH=. python bench/runtime/cpu_run_vs_generate.py --tiny      # a tiny random Llama, every path, seconds

Both sides load through qtool's loader as `qtool run` does (load_model(..., for_generation=True)): on the CPU a GPTQ
4-bit model's linears are then served by the cpu-int4 backend (torch's int4 kernel), and transformers' generate runs
the HF model holding those same QuantLinears (GPTQModel / AutoGPTQ are not installed here, so this is what a
transformers user gets). The engine is built with `qtool run`'s settings (CHAT_ENGINE_CONFIG sized by
EngineSizing) and streams its text to a callback, as run streams to the terminal; generate runs without a streamer.
Engine construction (KV cache allocation) is outside the timing, as a chat's later turns do not pay it.
--modules-too adds the same engine with fast_decode=False (decode steps through the model's modules: run's path
before it took the decode step on the CPU).

--profile N: after the rounds, torch.profiler over N new tokens of each system, the per-op host time per token
(self CPU time), printed and saved in the JSON line: where the engine's step loses against generate's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/ holds scripts, not packages: the shared modules import by name
from run_metadata import run_metadata  # noqa: E402

PROMPT_WORDS = 60  # words of the Grimm test split in the user message (about 90 prompt tokens with the template)


class FirstTokenClock:
    """A streamer for generate that only notes when the first new token arrived (its first put is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def user_message(data: Path | None) -> str:
    path = (data or Path("/nonexistent")) / "grimm" / "test.txt"
    text = path.read_text(encoding="utf-8") if path.is_file() else "once upon a time there lived a king " * 20
    return "Continue this story:\n\n" + " ".join(text.split()[:PROMPT_WORDS])


def load(source: str):
    from qtool.checkpoints.sources import load_model

    loaded = load_model(source, device="cpu", for_generation=True)
    return loaded.model.eval(), loaded.tokenizer


def backends_of(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        name = getattr(module, "backend", None)  # a RoutedLinear's requested backend
        if isinstance(name, str):
            counts[name] = counts.get(name, 0) + 1
    return counts


def run_engine_config(model):
    """The engine settings `qtool run` gives a chat (no --max-batch / --cache-blocks)."""
    from qtool.runtime.engine_sizing import EngineSizing
    from qtool.runtime.reply import CHAT_ENGINE_CONFIG

    return EngineSizing().engine_config(model, dataclasses.replace(CHAT_ENGINE_CONFIG, kv_cache="auto",
                                                                   block_size=None))


def new_engine(model, tokenizer, config):
    from qtool.runtime.engine import Engine

    return Engine(model, tokenizer, config)


def engine_once(engine, prompt: list[int], new_tokens: int) -> dict:
    """One reply through a fresh engine (built by the caller, outside the timing), its text streamed to a
    callback."""
    from qtool.runtime.engine import SamplingParams

    pieces: list[str] = []
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    began, began_cpu = time.perf_counter(), time.process_time()
    request = engine.add_request(prompt, params, on_text=pieces.append)
    output = None
    while output is None:
        output = next((out for out in engine.step() if out.request_id == request), None)
    wall, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    first = output.time_to_first_token_s
    return {"wall_s": wall, "cpu_s": cpu, "cpu_ms_per_token": cpu * 1e3 / len(output.token_ids),
            "ttft_s": first, "tok_s": len(output.token_ids) / wall,
            "decode_tok_s": (len(output.token_ids) - 1) / (output.seconds - first),
            "token_ids": output.token_ids, "decode_path": engine.runner.decode_step_reason}


def generate_once(model, tokenizer, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = FirstTokenClock()
    began, began_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad, top_k=None, top_p=None, temperature=None,
                             streamer=clock)
    wall, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    generated = out[0, len(prompt):].tolist()
    first = clock.first_token_time - began
    return {"wall_s": wall, "cpu_s": cpu, "cpu_ms_per_token": cpu * 1e3 / len(generated),
            "ttft_s": first, "tok_s": len(generated) / wall,
            "decode_tok_s": (len(generated) - 1) / (wall - first), "token_ids": generated}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def op_table(profile, tokens: int, top: int) -> list[dict]:
    rows = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "self_us_per_token": round(e.self_cpu_time_total / tokens, 1),
             "calls_per_token": round(e.count / tokens, 1), "share": round(e.self_cpu_time_total / total, 3)}
            for e in rows[:top]]


def profiled(run, tokens: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        run()
        wall = time.perf_counter() - began
    rows = prof.key_averages()
    return {"wall_ms_per_token": round(wall * 1e3 / tokens, 2),
            "ops_per_token": round(sum(e.count for e in rows) / tokens, 1),
            "self_cpu_ms_per_token": round(sum(e.self_cpu_time_total for e in rows) / tokens / 1e3, 2),
            "top_ops": op_table(prof, tokens, top)}


def measure_variant(name: str, source: str, args, message: str) -> dict:
    from qtool.runtime.generate import has_chat_template, prompt_ids

    model, tokenizer = load(source)
    # a chat turn as `qtool run` sends it (raw text, as --raw, where the tokenizer has no template: --tiny's)
    conversation = [{"role": "user", "content": message}] if has_chat_template(tokenizer) else message
    prompt = prompt_ids(tokenizer, conversation)[0].tolist()
    config = run_engine_config(model)
    configs = {"engine": config}
    if args.modules_too:  # the same engine with its decode steps through the model's modules (run before this bench)
        configs["engine-modules"] = dataclasses.replace(config, fast_decode=False)
    systems = [*configs, "generate"]

    def once(system: str, tokens: int) -> dict:
        if system == "generate":
            return generate_once(model, tokenizer, prompt, tokens)
        return engine_once(new_engine(model, tokenizer, configs[system]), prompt, tokens)

    for system in systems:  # first calls apart (allocator, lazy inits, a backend form rebuilt after fusion)
        once(system, 4)
    runs: dict[str, list[dict]] = {system: [] for system in systems}
    for round_ in range(args.rounds):
        shift = round_ % len(systems)  # each system takes each place in the order in turn
        for system in systems[shift:] + systems[:shift]:
            runs[system].append(once(system, args.new_tokens))
        print(f"  {name} round {round_}: " + ", ".join(
            f"{system} {runs[system][-1]['tok_s']:.1f} tok/s (decode {runs[system][-1]['decode_tok_s']:.1f})"
            for system in systems), flush=True)
    result = {
        "variant": name, "source": source, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "dtype": str(model.dtype), "backends": backends_of(model), "engine_config": repr(config),
        "decode_path": runs["engine"][0]["decode_path"], "systems": systems,
        "same_tokens": {system: all(e["token_ids"] == g["token_ids"] for e, g in zip(runs[system], runs["generate"]))
                        for system in configs},
    }
    for system, values in runs.items():
        for key in ("tok_s", "decode_tok_s", "ttft_s", "cpu_ms_per_token"):
            result[f"{system}_{key}"] = spread([round(v[key], 4) for v in values])
    for system in configs:  # per round: the systems of one round ran back to back
        ratios = [e["tok_s"] / g["tok_s"] for e, g in zip(runs[system], runs["generate"])]
        result[f"{system}_over_generate"] = spread([round(r, 3) for r in ratios])
        # the same by CPU time (this process's, all its threads): what load from other processes moves least
        ratios = [g["cpu_s"] / e["cpu_s"] for e, g in zip(runs[system], runs["generate"])]
        result[f"{system}_over_generate_cpu_time"] = spread([round(r, 3) for r in ratios])
    if args.profile:
        count = args.profile
        engine = new_engine(model, tokenizer, config)
        result["profile"] = {
            "engine": profiled(lambda: engine_once(engine, prompt, count), count, args.top_ops),
            "generate": profiled(lambda: generate_once(model, tokenizer, prompt, count), count, args.top_ops),
        }
    return result


def print_result(result: dict) -> None:
    g = result["generate_tok_s"]
    for system in result["systems"][:-1]:
        e, r = result[f"{system}_tok_s"], result[f"{system}_over_generate"]
        c = result[f"{system}_over_generate_cpu_time"]
        print(f"| {result['variant']} | {system} {e['median']:.1f} tok/s ({e['min']:.1f}-{e['max']:.1f}) | generate "
              f"{g['median']:.1f} tok/s ({g['min']:.1f}-{g['max']:.1f}) | {system}/generate {r['median']:.2f}x "
              f"({r['min']:.2f}-{r['max']:.2f}); by CPU time {c['median']:.2f}x ({c['min']:.2f}-{c['max']:.2f}) | "
              f"same tokens: {result['same_tokens'][system]} |", flush=True)
    for system, table in result.get("profile", {}).items():
        print(f"  profile {system}: {table['wall_ms_per_token']} ms/token wall, {table['self_cpu_ms_per_token']} ms "
              f"self CPU, {table['ops_per_token']} ops/token")
        for row in table["top_ops"]:
            print(f"    {row['self_us_per_token']:>9.1f} us {row['calls_per_token']:>7.1f}x  {row['op']}")


def tiny_sources(work: Path) -> tuple[str, str]:
    """A tiny random Llama (float) and its RTN 4-bit GPTQ checkpoint, written to `work`."""
    sys.path.insert(0, str(HERE))
    import bench_models

    float_dir = bench_models.tiny_float_dir(work / "tiny-float")
    calibration = work / "calibration.txt"
    calibration.write_text("once upon a time there lived a king and a queen who had no children " * 40)
    smol = bench_models.prepare_smollm2(str(float_dir), calibration, work, torch.device("cpu"), 4, 32)
    return str(smol.gptq_dir), str(float_dir)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gptq", default="out/smollm2-gptq-4bit")
    p.add_argument("--float", default="smollm2-135m", help="the float model the GPTQ checkpoint came from")
    p.add_argument("--variant", action="append", choices=("gptq-4bit", "float32"), help="default: both")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modules-too", action="store_true",
                   help="also the engine with fast_decode=False (decode steps through the model's modules)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N new tokens of each system")
    p.add_argument("--top-ops", type=int, default=15)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and its 4-bit checkpoint")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per variant")
    args = p.parse_args(argv)
    args.variant = args.variant or ["gptq-4bit", "float32"]
    if args.tiny:
        args.new_tokens, args.rounds = min(args.new_tokens, 8), min(args.rounds, 2)
        args.profile = min(args.profile, 4)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.gptq, args.float = tiny_sources(Path(tempfile.mkdtemp(prefix="cpu_run_bench_")))
    env = run_metadata(torch.device("cpu"), __file__, sys.argv[1:] if argv is None else list(argv),
                       libraries=("transformers",))
    env.update(torch_threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
               load_average=os.getloadavg(), tiny=args.tiny)
    message = user_message(args.data)
    print(f"# torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={env['omp_num_threads']}, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds", flush=True)
    sources = {"gptq-4bit": args.gptq, "float32": args.float}
    for variant in args.variant:
        result = {**measure_variant(variant, sources[variant], args, message), **env}
        print_result(result)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
