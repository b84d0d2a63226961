"""`qtool serve` under load (issue 25's bench): a Llama-2-7B-shaped model with random 4-bit g128 GPTQ linears
(bench/runtime/bench_models.py builds it), the same workload twice in one run:
  engine offline  every request submitted at once to one Engine (with the tokenizer, as `qtool run --batch`)
  http serve      the same requests from N concurrent HTTP clients (a separate process, streaming
                  /v1/completions by token ids) against create_app + uvicorn on loopback, on an engine of the same
                  settings
Output tokens/s of each (output tokens over the wall time from the first request to the last token), the HTTP/offline
ratio, and p50/p99 time to first token (offline: from add_request; HTTP: measured by the clients, from sending the
request to the first text chunk). Where the server's host time goes: the CPU seconds of its event loop's thread
and of its engine's thread during the timed run (beside the offline engine's), the SSE chunks the clients got and
the stream pacer's last state (serve/stream_pacing.py). JSON lines with device, versions, commit, command and date.

    python bench/serve/serve_bench.py --out serve.jsonl                   # 128 clients, 7B shape, on the GPU
    python bench/serve/serve_bench.py --tiny --device cpu --out /tmp/s.jsonl   # every path, tiny, on a CPU
    python bench/serve/serve_bench.py --tiny --device cpu --clients-count 128 --new-tokens 128 --kv-gib 0.0625
        # the GPU's client count on a model so cheap that the host's own work dominates (a CPU)
    python bench/serve/serve_bench.py --stream-cpu-budget 1.0   # every stream sends every step's text (no pacing)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNTIME = HERE.parent / "runtime"
sys.path.insert(0, str(RUNTIME))  # bench/ holds scripts, not packages: the runtime bench's modules import by name
sys.path.insert(0, str(HERE.parent))  # and the modules every bench script shares


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- the clients (their own process: the server's GIL is not theirs) ----


async def one_client(client, body: dict) -> dict:
    began = time.perf_counter()
    first, usage, chunks, finish = None, None, 0, None
    async with client.stream("POST", "/v1/completions", content=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"}) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "error": (await response.aread()).decode()[:500]}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "error": json.dumps(chunk)[:500]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and first is None:
                    first = time.perf_counter() - began
                chunks += 1
                finish = choice.get("finish_reason") or finish
    return {"status": 200, "ttft_s": first, "seconds": time.perf_counter() - began, "chunks": chunks,
            "finish_reason": finish, "completion_tokens": (usage or {}).get("completion_tokens"),
            "began": began, "ended": time.perf_counter()}


async def all_clients(url: str, bodies: list[dict]) -> list[dict]:
    try:
        import httpx2 as httpx  # the project's venv (the openai client's HTTP library)
    except ImportError:
        import httpx  # the GPU machine's image

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=3600) as client:
        return await asyncio.gather(*[one_client(client, body) for body in bodies])


def clients_main(url: str, requests_path: str, out_path: str) -> int:
    bodies = json.loads(Path(requests_path).read_text())
    results = asyncio.run(all_clients(url, bodies))
    Path(out_path).write_text(json.dumps(results))
    return 0


def run_clients(url: str, bodies: list[dict], work: Path) -> list[dict]:
    requests_path, out_path = work / "requests.json", work / "results.json"
    requests_path.write_text(json.dumps(bodies))
    out_path.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--clients", url, str(requests_path), str(out_path)], check=True)
    return json.loads(out_path.read_text())


# ---- the measured systems ----


def thread_cpu_s(thread: threading.Thread) -> float:
    """The CPU seconds a running thread has used (its own clock: the other threads' and processes' not counted)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def offline(model, tokenizer, prompts: list[list[int]], new_tokens: int, config, device) -> dict:
    import bench_peers

    cpu = time.thread_time()
    result = bench_peers.engine_run(model, prompts, new_tokens, config, device, tokenizer=tokenizer)
    result["engine_cpu_s"] = time.thread_time() - cpu
    result.pop("token_ids")
    ttft = result.pop("ttft_s", [])
    return {**result, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99)}


def served(model, tokenizer, prompts: list[list[int]], new_tokens: int, config, work: Path,
           stream_cpu_budget: float) -> dict:
    from qtool.serve.app import create_app
    from qtool.serve.model_pool import ServedModel
    from qtool.serve.server import build_server
    from qtool.serve.settings import ServeSettings

    settings = ServeSettings(port=0, max_tokens_limit=max(new_tokens, 16), max_n=1, stream_cpu_budget=stream_cpu_budget)
    model_entry = ServedModel("bench", model, tokenizer, config)
    app = create_app([model_entry], settings)
    server = build_server(app, settings, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.port}"
    try:
        def body(prompt, tokens):
            return {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}

        run_clients(url, [body(p, 2) for p in prompts[:2]], work)  # compile and tune outside the timing
        generated_before = model_entry.worker.snapshot.stats["generated_tokens"]
        # the server process's two busy threads: the event loop (HTTP, SSE) and the engine's (its steps)
        engine_thread = next(t for t in threading.enumerate() if t.name == f"qtool-engine-{model_entry.name}")
        cpu_before = thread_cpu_s(thread), thread_cpu_s(engine_thread)
        results = run_clients(url, [body(p, new_tokens) for p in prompts], work)
        loop_cpu, engine_cpu = (thread_cpu_s(t) - before for t, before in zip((thread, engine_thread), cpu_before))
        pacer = app.state.pacers[model_entry.name]
        stats = model_entry.worker.snapshot.stats
        peak = model_entry.worker.snapshot.peak_running
    finally:
        server.handle_exit(2, None)
        thread.join(120)
    failed = [r for r in results if r["status"] != 200]
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    wall = max(r["ended"] for r in ok) - min(r["began"] for r in ok) if ok else float("nan")
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {"requests": len(prompts), "finished": len(ok), "failed": len(failed), "errors": [r["error"] for r in failed][:3],
            "complete": not failed and all(r["completion_tokens"] == new_tokens for r in ok),
            "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall if wall > 0 else None,
            "engine_generated_tokens": stats["generated_tokens"] - generated_before,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99), "peak_running": peak,
            "loop_cpu_s": loop_cpu, "engine_cpu_s": engine_cpu, "sse_choice_chunks": sum(r["chunks"] for r in ok),
            "stream_cpu_budget": stream_cpu_budget, "last_stream_every_steps": pacer.every,
            "last_loop_cpu_share": pacer.loop_share, "stats": stats}


# ---- the run ----


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    from qtool.serve.settings import ServeSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama, few clients, few tokens: every path on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "serve_bench.jsonl")
    p.add_argument("--work", type=Path, default=None, help="folder for the clients' request and result files")
    # each default: (full, --tiny); a value given on the command line wins over both, so `--tiny --clients-count
    # 128 --new-tokens 256` is the GPU's workload on a model so cheap that the host's own work is what is measured
    defaults = {"clients_count": (128, 12), "new_tokens": (256, 8), "min_prompt": (128, 8), "max_prompt": (1024, 32),
                "kv_gib": (30.0, 1 / 32)}
    p.add_argument("--clients-count", type=int, help="concurrent HTTP clients (= requests); 128, --tiny 12")
    p.add_argument("--new-tokens", type=int, help="tokens each request generates; 256, --tiny 8")
    p.add_argument("--min-prompt", type=int, help="shortest random prompt; 128, --tiny 8")
    p.add_argument("--max-prompt", type=int, help="longest random prompt; 1024, --tiny 32")
    p.add_argument("--kv-gib", type=float, help="KV cache size in GiB; 30, --tiny 1/32")
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-cpu-budget", type=float, default=ServeSettings.stream_cpu_budget,
                   help="the server's ServeSettings.stream_cpu_budget (1.0: every stream sends every step's text)")
    args = p.parse_args(argv)
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--clients"]:
        return clients_main(*argv[1:4])
    import torch

    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run(args, argv, threads)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str], threads: int) -> int:
    import torch

    import bench_models
    import bench_peers
    import runtime_bench
    from qtool.runtime.engine import EngineConfig
    from run_metadata import run_metadata

    if args.tiny:
        # one intra-op thread for both systems: the engine's worker thread runs torch ops on its own thread, and an
        # oversubscribed CPU makes the main thread's OpenMP team many times slower than that (tiny matmuls only)
        torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: pass --device cpu (with --tiny for a quick run)", file=sys.stderr)
        return 2
    env = run_metadata(device, __file__, argv, libraries=("triton", "transformers"))
    env["torch_threads"] = torch.get_num_threads()
    record = runtime_bench.Recorder(args.out, env, args.tiny)
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    model = bench_models.random_llama(args.tiny, dtype, device, args.seed)
    count = bench_models.quantize_linears_randomly(model, seed=args.seed)
    backends = bench_models.set_backend(model, device)
    tokenizer = bench_models.synthetic_tokenizer(model.config.vocab_size)
    record("prepare", "llama-7b-shape-gptq-4bit", f"{count} random 4-bit g128 linears", backends=backends,
           build_s=round(time.perf_counter() - began, 1),
           shape=bench_models.TINY_LLAMA if args.tiny else bench_models.LLAMA2_7B)
    prompts = runtime_bench.random_prompts(args.clients_count, args.min_prompt, args.max_prompt,
                                           model.config.vocab_size, args.seed)
    config = EngineConfig(kv_cache_bytes=int(args.kv_gib * (1 << 30)), max_num_seqs=max(args.clients_count, 1),
                          max_num_batched_tokens=args.max_batched_tokens)
    common = dict(new_tokens=args.new_tokens,
                  prompt_tokens=sum(len(p) for p in prompts), kv_cache_bytes=config.kv_cache_bytes,
                  max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)

    bench_peers.engine_run(model, prompts[:2], 2, config, device, tokenizer=tokenizer)  # compile and tune first
    base = offline(model, tokenizer, prompts, args.new_tokens, config, device)
    record("serve", "engine offline", f"{base['output_tok_s']:.1f} output tok/s, TTFT p50 {base['ttft_p50_s']:.3f} s "
           f"p99 {base['ttft_p99_s']:.3f} s", **common, **runtime_bench.strip(base))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    http = served(model, tokenizer, prompts, args.new_tokens, config, work, args.stream_cpu_budget)
    ratio = http["output_tok_s"] / base["output_tok_s"] if http["output_tok_s"] else None
    record("serve", f"http serve ({args.clients_count} clients)",
           f"{http['output_tok_s'] or 0:.1f} output tok/s ({ratio or 0:.2f}x offline), TTFT p50 "
           f"{http['ttft_p50_s'] or 0:.3f} s p99 {http['ttft_p99_s'] or 0:.3f} s; CPU s loop {http['loop_cpu_s']:.2f} "
           f"engine {http['engine_cpu_s']:.2f} (offline {base['engine_cpu_s']:.2f}); {http['sse_choice_chunks']} SSE chunks"
           f"{'' if http['complete'] else ' (incomplete: see failed/errors)'}",
           **common, ratio_to_offline=ratio, **runtime_bench.strip(http))
    return 0 if http["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
