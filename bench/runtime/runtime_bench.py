"""The engine's benchmarks of issue 23, each a scenario printing table rows and appending JSON lines to --out (device,
versions, git commit, command line, date with every line). Peers run in the same process, on the same prompts.

    python bench/runtime/runtime_bench.py --gguf SmolLM2.gguf --data DIR --out runtime.jsonl [--scenario NAME ...]
    python bench/runtime/runtime_bench.py --tiny --device cpu --out /tmp/r.jsonl      # every path, tiny, on a CPU

Scenarios (all by default, in this order):
  smollm2-run  SmolLM2 GPTQ 4-bit (quantized here from the float GGUF) and float, batch 1, greedy, 128 new tokens:
               engine vs transformers' generate on the same loaded model (the engine's KV cache: --kv-cache)
  speculative  prompt-lookup speculative decoding on a copy-heavy prompt (SmolLM2 GPTQ 4-bit): tok/s with and
               without, acceptance (skipped with a note while EngineConfig has no such field)
  throughput   N requests at once (prompts 128-1024 random ids, 256 new tokens, eos ignored) on a Llama-2-7B-shaped
               model with random 4-bit g128 GPTQ linears: engine vs transformers' padded batch generate (fewer
               requests, measured as run) vs ExLlamaV2 0.3.2's dynamic generator on random EXL2 weights of that shape
  prefix       32 requests sharing a 2,000-token prefix: prefill skipped, TTFT of the first alone vs the others'
  kv-capacity  tokens a fixed KV byte budget holds with kv_cache fp16 / q8 / q4 (skipped while the field is absent)
  decode-7b    batch-1 decode through the engine at a 512-token context, 7B-shaped 4-bit and bf16
Each system's rate is what it measured: a run stopped by its time budget says complete: false.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ holds scripts, not packages: the sibling modules import by name
sys.path.insert(0, str(HERE.parent))  # and the modules every bench script shares

import torch  # noqa: E402

import bench_models  # noqa: E402
import bench_peers  # noqa: E402
from run_metadata import run_metadata  # noqa: E402

SCENARIOS = ("smollm2-run", "speculative", "throughput", "prefix", "kv-capacity", "decode-7b")
KV_CACHE_KINDS = ("fp16", "q8", "q4")
# EngineConfig fields that would name speculative decoding; their absence means the feature is not built yet
SPECULATIVE_FIELD = re.compile(r"spec|draft|lookup|ngram")
# settings tried, in order, to switch prompt-lookup drafting on when --spec-config is not given
SPECULATIVE_GUESSES = ({"speculative": "ngram"}, {"speculative": "prompt_lookup"}, {"prompt_lookup": True})


# ---- what every line carries ----


def environment(device: torch.device, argv: list[str]) -> dict:
    return {
        **run_metadata(device, __file__, argv, libraries=("triton", "transformers")),
        # what else ran on the machine meanwhile (bench/device/runtime_bench.sh says when it builds ExLlamaV2)
        "note": os.environ.get("RUNTIME_BENCH_NOTE"),
    }


class Recorder:
    """Appends one JSON line per result to --out and prints a table row for it."""

    def __init__(self, out: Path, env: dict, tiny: bool):
        self.out, self.env, self.tiny = out, env, tiny
        self.rows: list[dict] = []
        out.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, scenario: str, system: str, summary: str, **fields) -> dict:
        row = {"scenario": scenario, "system": system, "summary": summary, "tiny": self.tiny, **fields, **self.env}
        row.pop("token_ids", None)
        with self.out.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        self.rows.append(row)
        print(f"| {scenario} | {system} | {summary} |", flush=True)
        return row


def rounded(value, digits: int = 1):
    return None if value is None else round(value, digits)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompt lengths uniform in [low, high], ids uniform over the vocabulary past the special ids 0..2."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def engine_fields() -> set[str]:
    from qtool.runtime.engine import EngineConfig

    return {f.name for f in dataclasses.fields(EngineConfig)}


# ---- shared state of one run (no globals): the models, built once and freed when no scenario needs them ----


class Context:
    def __init__(self, args: argparse.Namespace, record: Recorder):
        self.args, self.record = args, record
        self.device = torch.device(args.device)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="runtime_bench_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.float_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # the 7B-shaped model runs float16 where ExLlamaV2 (float16 only) is its peer
        self.llama_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._smol = None
        self._llama = None
        self.exl2_dir: Path | None = None
        self.exl2_note: str | None = None

    def budget(self, seconds: float) -> float:
        return seconds if not self.args.tiny else max(seconds, 120.0)

    # SmolLM2 (--tiny: a tiny random Llama with a trained little tokenizer)
    def smol(self) -> bench_models.SmolModels:
        if self._smol is None:
            args = self.args
            if args.tiny:
                source = str(bench_models.tiny_float_dir(self.work / "tiny-float"))
                calibration = self.work / "calibration.txt"
                calibration.write_text("once upon a time there lived a king and a queen who had no children " * 40)
                self._smol = bench_models.prepare_smollm2(source, calibration, self.work, self.device, 4, 32)
            elif args.smol_shape:
                # SmolLM2's config and tokenizer with random weights (its GGUF exceeds one device call's carry):
                # the tokens per second of a fixed-length greedy run do not depend on the weights' values
                source = str(bench_models.random_float_dir(Path(args.smol_shape), self.work / "smol-random", args.seed))
                calibration = Path(args.data) / "wiki.valid.tokens"
                self._smol = bench_models.prepare_smollm2(source, calibration, self.work, self.device,
                                                          args.calibration_samples, 512)
            else:
                if not args.gguf or not Path(args.gguf).is_file():
                    raise SkipScenario(f"SmolLM2 GGUF not found at {args.gguf!r} (carry it: bench/device/prepare_carry.sh)")
                calibration = Path(args.data) / "wiki.valid.tokens"
                self._smol = bench_models.prepare_smollm2(args.gguf, calibration, self.work, self.device,
                                                          args.calibration_samples, 512)
            self.record("prepare", "smollm2-gptq-4bit", f"quantized in {self._smol.quantize_s} s",
                        quantize_s=self._smol.quantize_s, calibration=self._smol.calibration)
        return self._smol

    # the 7B-shaped 4-bit model (float16 activations), with the EXL2 twin written first when ExLlamaV2 will run
    def llama(self):
        if self._llama is None:
            args = self.args
            began = time.perf_counter()
            model = bench_models.random_llama(args.tiny, self.llama_dtype, self.device, args.seed)
            if "throughput" in args.scenario and not args.skip_exllamav2:
                self.exl2_note = self._write_exl2(model)
            count = bench_models.quantize_linears_randomly(model, seed=args.seed)
            backends = bench_models.set_backend(model, self.device)
            free_memory()
            self._llama = model
            self.record("prepare", "llama-7b-shape-gptq-4bit", f"{count} random 4-bit g128 linears",
                        build_s=round(time.perf_counter() - began, 1), backends=backends,
                        shape=bench_models.TINY_LLAMA if args.tiny else bench_models.LLAMA2_7B,
                        exl2=self.exl2_note or str(self.exl2_dir))
        return self._llama

    def _write_exl2(self, model) -> str | None:
        if self.device.type != "cuda":
            return "ExLlamaV2 needs CUDA"
        why = bench_peers.exllamav2_available()
        if why:
            return why
        directory = self.work / "llama-exl2"
        try:
            info = bench_models.write_random_exl2(model, directory, self.args.seed)
        except Exception as exc:  # the row says why ExLlamaV2 did not run
            return f"writing the EXL2 checkpoint failed: {type(exc).__name__}: {exc}"
        self.exl2_dir = directory
        self.record("prepare", "llama-7b-shape-exl2", f"{info['bits_per_weight']} bpw in {info['write_s']} s", **info)
        return None

    def drop_llama(self) -> None:
        self._llama = None
        free_memory()


class SkipScenario(Exception):
    """A scenario that cannot run here; its row says why."""


# ---- scenarios ----


def smollm2_run(ctx: Context) -> None:
    args, device = ctx.args, ctx.device
    smol = ctx.smol()
    new = args.smol_new_tokens
    for variant, source, dtype in (("gptq-4bit", smol.gptq_dir, ctx.float_dtype), ("float", smol.float_source, ctx.float_dtype)):
        model, tokenizer = bench_models.load(source, device, dtype)
        prompt = tokenizer(copy_text(args, 60))["input_ids"][:64]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        began = time.perf_counter()
        bench_peers.hf_generate(model, [prompt], 4, pad, device)  # first calls apart
        first_hf_s = time.perf_counter() - began
        hf = bench_peers.hf_generate(model, [prompt], new, pad, device)
        first_setting = None  # the first --fusion setting's run, set against transformers' generate
        for fuse in FUSION_SETTINGS[args.fusion]:
            config = engine_config(kv_cache_bytes=256 << 20, fuse_projections=fuse, kv_cache=args.kv_cache,
                                   **prefill_setting(args))
            # first calls apart: Triton compiles and the tuner times its candidates there
            began = time.perf_counter()
            bench_peers.engine_run(model, [prompt], 4, config, device)
            first_engine_s = time.perf_counter() - began
            engine = bench_peers.engine_run(model, [prompt], new, config, device)
            first_setting = first_setting or engine
            same = engine["token_ids"][0] == hf["token_ids"][0]
            kind = "" if args.kv_cache == "auto" else f" kv {args.kv_cache}"
            ctx.record("smollm2-run", f"engine {variant}{'' if fuse else ' unfused'}{kind}",
                       f"{engine['output_tok_s']:.1f} tok/s ({new} new tokens, decode "
                       f"{engine.get('decode_tok_s_mean', 0):.1f} tok/s, TTFT {engine['ttft_s'][0] * 1e3:.0f} ms)",
                       variant=variant, fuse_projections=fuse, kv_cache=args.kv_cache, prompt_tokens=len(prompt),
                       first_calls_s=round(first_engine_s, 2), same_tokens_as_hf=same, **strip(engine))
        ctx.record("smollm2-run", f"hf-generate {variant}", f"{hf['output_tok_s']:.1f} tok/s ({new} new tokens); "
                   f"engine/HF {first_setting['output_tok_s'] / hf['output_tok_s']:.2f}x", variant=variant,
                   prompt_tokens=len(prompt), first_calls_s=round(first_hf_s, 2), **strip(hf))
        del model
        free_memory()


def speculative(ctx: Context) -> None:
    from qtool.runtime.engine import EngineConfig

    args, device = ctx.args, ctx.device
    found = sorted(name for name in engine_fields() if SPECULATIVE_FIELD.search(name))
    if not found:
        raise SkipScenario("EngineConfig has no speculative-decoding field yet")
    guesses = [json.loads(args.spec_config)] if args.spec_config else list(SPECULATIVE_GUESSES)
    settings = next((g for g in guesses if set(g) <= set(found) and constructs(EngineConfig, g)), None)
    if settings is None:
        raise SkipScenario(f"EngineConfig has {found} but none of the settings tried switch prompt-lookup on: "
                           "pass --spec-config JSON")
    smol = ctx.smol()
    model, tokenizer = bench_models.load(smol.gptq_dir, device, ctx.float_dtype)
    text = copy_text(args, args.spec_words)
    request = f"Copy the following text exactly, word for word:\n\n{text}"
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(request + "\n\n")["input_ids"]
    new = min(args.spec_new_tokens, len(tokenizer(text)["input_ids"]) + 16)
    runs = {}
    for label, extra in (("plain", {}), ("prompt-lookup", settings)):
        config = engine_config(kv_cache_bytes=256 << 20, **extra)
        bench_peers.engine_run(model, [prompt], 4, config, device, tokenizer=tokenizer)  # compile, tune
        runs[label] = bench_peers.engine_run(model, [prompt], new, config, device, tokenizer=tokenizer, ignore_eos=False)
    plain, spec = runs["plain"], runs["prompt-lookup"]
    accept = {k: v for k, v in spec["stats"].items() if re.search(r"accept|draft|propos|spec", k)}
    rates = [f"{name} acceptance {d['acceptance_rate']:.0%} ({d.get('accepted')}/{d.get('drafted')} drafted tokens)"
             for name, d in (accept.get("speculation") or {}).items() if isinstance(d, dict) and "acceptance_rate" in d]
    ctx.record("speculative", "engine plain", f"{plain['output_tok_s']:.1f} tok/s ({plain['output_tokens']} tokens)",
               prompt_tokens=len(prompt), **strip(plain))
    ctx.record("speculative", "engine prompt-lookup",
               f"{spec['output_tok_s']:.1f} tok/s, {spec['output_tok_s'] / plain['output_tok_s']:.2f}x plain; "
               f"{'; '.join(rates) or accept}",
               settings=settings, prompt_tokens=len(prompt), acceptance=accept,
               same_tokens_as_plain=spec["token_ids"] == plain["token_ids"], **strip(spec))
    del model
    free_memory()


def throughput(ctx: Context) -> None:
    args, device = ctx.args, ctx.device
    model = ctx.llama()
    vocab = model.config.vocab_size
    low, high = (8, 32) if args.tiny else (128, 1024)
    prompts = random_prompts(args.requests, low, high, vocab, args.seed)
    new = args.new_tokens
    kv_bytes = int(args.kv_gib * (1 << 30))
    config = engine_config(kv_cache_bytes=kv_bytes, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_batched_tokens)
    bench_peers.engine_run(model, prompts[:2], 2, config, device)  # compile and tune outside the timing
    engine = bench_peers.engine_run(model, prompts, new, config, device, deadline_s=ctx.budget(args.engine_budget_s))
    ctx.record("throughput", "engine", f"{engine['output_tok_s']:.0f} output tok/s over {engine['requests']} requests"
               f"{'' if engine['complete'] else ' (stopped by its time budget: incomplete)'}",
               kv_cache_bytes=kv_bytes, max_num_seqs=args.max_num_seqs, prompt_lengths=[len(p) for p in prompts],
               new_tokens=new, **strip(engine))
    free_memory()
    hf_prompts = prompts[: args.hf_requests]
    bench_peers.hf_generate(model, hf_prompts[:2], 2, 0, device)
    hf = bench_peers.hf_generate(model, hf_prompts, new, 0, device)
    ctx.record("throughput", "hf-generate (padded batch)",
               f"{hf['output_tok_s']:.0f} output tok/s over {hf['requests']} requests (measured at that count); "
               f"engine/HF {engine['output_tok_s'] / hf['output_tok_s']:.1f}x", new_tokens=new, **strip(hf))
    free_memory()
    if args.skip_exllamav2:
        ctx.record("throughput", "exllamav2 dynamic", f"not run: {args.skip_exllamav2}", error=args.skip_exllamav2)
        return
    if ctx.exl2_dir is None:
        ctx.record("throughput", "exllamav2 dynamic", f"not run: {ctx.exl2_note}", error=ctx.exl2_note)
        return
    try:
        ex = bench_peers.exllamav2_dynamic(ctx.exl2_dir, prompts[: args.exl2_requests], new,
                                           max_seq_len=high + new + 256, cache_bytes=kv_bytes,
                                           deadline_s=args.exl2_budget_s)
    except Exception as exc:  # the row says what failed
        ctx.record("throughput", "exllamav2 dynamic", f"failed: {type(exc).__name__}: {str(exc)[:200]}",
                   error=traceback.format_exc()[-3000:])
        return
    mode = "paged (batched)" if ex["paged"] else "unpaged: one request at a time (no flash-attn)"
    ctx.record("throughput", "exllamav2 dynamic", f"{ex['output_tok_s']:.0f} output tok/s over {ex['requests']} "
               f"requests, {mode}; engine/ExLlamaV2 {engine['output_tok_s'] / ex['output_tok_s']:.1f}x"
               f"{'' if ex['complete'] else ' (incomplete)'}", new_tokens=new, **ex)


def prefix(ctx: Context) -> None:
    args, device = ctx.args, ctx.device
    model = ctx.llama()
    vocab = model.config.vocab_size
    rng = random.Random(args.seed + 7)
    shared_len = 100 if args.tiny else args.prefix_tokens
    shared = [rng.randrange(3, vocab) for _ in range(shared_len)]
    prompts = [shared + [rng.randrange(3, vocab) for _ in range(32)] for _ in range(args.prefix_requests)]
    # a second set with fresh suffixes, sent all at once: their time to first token is the batch's first step
    together = [shared + [rng.randrange(3, vocab) for _ in range(32)] for _ in range(args.prefix_requests - 1)]
    from qtool.runtime.engine import Engine, SamplingParams

    engine = Engine(model, None, engine_config(kv_cache_bytes=(64 << 20) if args.tiny else (8 << 30),
                                               max_num_batched_tokens=max(2048, shared_len + 64),
                                               **prefill_setting(args)))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    # compile and tune on a separate cache
    warm = Engine(model, None, engine_config(kv_cache_bytes=64 << 20, **prefill_setting(args)))
    warm.generate([[5] * 64], params)
    del warm
    first = run_all(engine, prompts[:1], params, device)
    saved_before = engine.stats().saved_prompt_tokens
    # the goal's measure: each later request arrives on its own, as a user's would, and finds the prefix cached
    others = [run_all(engine, [prompt], params, device)[0] for prompt in prompts[1:]]
    skipped = (engine.stats().saved_prompt_tokens - saved_before) / (shared_len * len(prompts[1:]))
    batched = run_all(engine, together, params, device)
    stats = engine.stats()
    median = statistics.median(o.time_to_first_token_s for o in others)
    median_batched = statistics.median(o.time_to_first_token_s for o in batched)
    ttft_first = first[0].time_to_first_token_s
    ctx.record("prefix", "engine", f"{skipped:.1%} of the shared prefix's prefill skipped; TTFT first "
               f"{ttft_first * 1e3:.0f} ms, others one at a time median {median * 1e3:.0f} ms "
               f"({median / ttft_first:.2f} of the first); {len(batched)} sent at once median "
               f"{median_batched * 1e3:.0f} ms", shared_prefix_tokens=shared_len, suffix_tokens=32,
               requests=len(prompts), prefill_skipped=skipped, ttft_first_s=ttft_first, ttft_others_median_s=median,
               ttft_others_s=[o.time_to_first_token_s for o in others],
               ttft_batched_s=[o.time_to_first_token_s for o in batched], stats=stats.to_dict(),
               short_prefill_rows=engine.runner.short_prefill_rows,
               short_prefill_steps=engine.runner.short_prefill_steps,
               fast_prefill_steps=engine.runner.fast_prefill_steps)
    del engine
    free_memory()


def run_all(engine, prompts, params, device) -> list:
    bench_peers.synchronize(device)
    return engine.generate(prompts, params)


def kv_capacity(ctx: Context) -> None:
    from qtool.runtime.engine import Engine, SamplingParams

    if "kv_cache" not in engine_fields():
        raise SkipScenario("EngineConfig has no kv_cache field yet (fp16/q8/q4 cache)")
    args, device = ctx.args, ctx.device
    model = ctx.llama()
    budget = int((1 if args.tiny else args.kv_capacity_mib) * (1 << 20))
    # each kind at its own block size (q4: 64, the group of its keys' per-channel parameters; else 16); prompts of
    # whole blocks of either (+ 2 new tokens)
    prompt_len = (1 if args.tiny else 8) * 64 - 2
    # one cap on running sequences for the probe and the fill: q4 stages the filling block (keys and values, model
    # dtype) of each running sequence inside the budget, so the cap moves the block count
    seqs = 2 if args.tiny else args.kv_capacity_seqs
    rows = {}
    for kind in KV_CACHE_KINDS:
        free_memory()
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        probe = Engine(model, None, engine_config(kv_cache_bytes=budget, kv_cache=kind, max_num_seqs=seqs))
        capacity, num_blocks, block = probe.capacity_tokens, probe.num_blocks, probe.config.block_size
        staging = probe.runner.cache.nbytes - num_blocks * probe.runner.kv_bytes_per_block(
            model, block, probe.config.kv_dtype, kind)
        per_token = probe.runner.kv_bytes_per_block(model, block, probe.config.kv_dtype, kind) / block
        allocated = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
        del probe
        free_memory()
        # fill it: as many requests of prompt_len + 2 tokens as the blocks hold, all admitted in one step
        count = min(seqs, num_blocks // ((prompt_len + 2) // block))
        engine = Engine(model, None, engine_config(kv_cache_bytes=budget, kv_cache=kind, max_num_seqs=seqs,
                                                   max_num_batched_tokens=count * prompt_len))
        prompts = random_prompts(count, prompt_len, prompt_len, model.config.vocab_size, args.seed + 3)
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, params)
        peak = 0
        while engine.has_unfinished():
            engine.step()
            peak = max(peak, engine.stats().blocks_used)
        stats = engine.stats()
        rows[kind] = (capacity, per_token)
        ratio = capacity / rows["fp16"][0]
        per_token_ratio = rows["fp16"][1] / per_token
        ctx.record("kv-capacity", f"engine kv_cache={kind}",
                   f"{capacity} tokens in {budget / (1 << 20):g} MiB ({ratio:.2f}x fp16; blocks alone "
                   f"{per_token_ratio:.2f}x, staging {staging / (1 << 20):.1f} MiB for {seqs} sequences); filled to "
                   f"{peak * block} tokens at once by {count} requests, {stats.preemptions} preemptions",
                   kv_cache=kind, budget_bytes=budget, capacity_tokens=capacity, ratio_to_fp16=ratio,
                   block_size=block, bytes_per_token=per_token, per_token_ratio_to_fp16=per_token_ratio,
                   staging_bytes=staging, max_num_seqs=seqs,
                   allocated_bytes=allocated, fill_requests=count, fill_prompt_tokens=prompt_len,
                   peak_tokens_held=peak * block, stats=stats.to_dict())
        del engine
    free_memory()


def decode_7b(ctx: Context) -> None:
    args, device = ctx.args, ctx.device
    ctx.drop_llama()
    external = HERE / "engine_decode.py"
    if external.exists() and not args.tiny:
        # the engine's own decode bench (CUDA graphs, eager, module path): its table stands for this scenario
        result_file = ctx.work / "engine_decode.json"
        cmd = [sys.executable, str(external), "--context", str(args.decode_context), "--new-tokens",
               str(args.decode_new_tokens), "--fusion", args.fusion, "--out", str(result_file),
               *shlex.split(args.engine_decode_args)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.engine_decode_timeout_s)
            status, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            status, stdout, stderr = "timeout", str(exc.stdout or ""), str(exc.stderr or "")
        result = json.loads(result_file.read_text()) if status == 0 and result_file.exists() else None
        ctx.record("decode-7b", "bench/runtime/engine_decode.py", f"exit {status}; its table: {stdout.strip()[-600:]}",
                   cmd=cmd, result=result, stdout_tail=stdout[-4000:], stderr_tail=stderr[-2000:])
        if status == 0:
            return
    context = 64 if args.tiny else args.decode_context
    new = args.decode_new_tokens
    prompt = random_prompts(1, context, context, 320 if args.tiny else 32000, args.seed + 11)[0]
    model = bench_models.random_llama(args.tiny, ctx.float_dtype, device, args.seed)
    rates = {}
    for label in ("bf16" if device.type == "cuda" else "float32", "gptq-4bit"):
        if label == "gptq-4bit":
            bench_models.quantize_linears_randomly(model, seed=args.seed)
            bench_models.set_backend(model, device)
            free_memory()
        for fuse in FUSION_SETTINGS[args.fusion]:
            config = engine_config(kv_cache_bytes=1 << 30 if not args.tiny else 16 << 20, fuse_projections=fuse)
            bench_peers.engine_run(model, [prompt], 4, config, device)  # compile, tune
            result = bench_peers.engine_run(model, [prompt], new, config, device)
            rates.setdefault(label, result.get("decode_tok_s_mean"))  # the first setting's, for the ratio
            ctx.record("decode-7b", f"engine {label}{'' if fuse else ' unfused'}",
                       f"decode {result.get('decode_tok_s_mean', 0):.1f} tok/s at a {context}-token context "
                       f"({new} new tokens, end to end {result['output_tok_s']:.1f} tok/s)",
                       context_tokens=context, new_tokens=new, fuse_projections=fuse, **strip(result))
    values = list(rates.values())
    if all(values):
        ctx.record("decode-7b", "4-bit / float", f"{values[1] / values[0]:.2f}x", rates=rates)
    del model
    free_memory()


# --fusion -> the EngineConfig.fuse_projections values a scenario runs, in order
FUSION_SETTINGS = {"on": (True,), "off": (False,), "both": (True, False)}
SCENARIO_FUNCTIONS = {"smollm2-run": smollm2_run, "speculative": speculative, "throughput": throughput,
                      "prefix": prefix, "kv-capacity": kv_capacity, "decode-7b": decode_7b}


# ---- helpers ----


def prefill_setting(args) -> dict:
    """--fast-prefill and --short-prefill-rows as EngineConfig fields: {} keeps the engine's defaults."""
    fields = {} if args.fast_prefill is None else {"fast_prefill": args.fast_prefill == "on"}
    if args.short_prefill_rows is not None:
        fields["short_prefill_rows"] = args.short_prefill_rows
    return fields


def engine_config(**fields):
    from qtool.runtime.engine import EngineConfig

    return EngineConfig(**fields)


def constructs(cls, settings: dict) -> bool:
    try:
        cls(**settings)
    except Exception:  # any refusal means this guess is not the API
        return False
    return True


def strip(result: dict) -> dict:
    """A run's result without its token ids (kept out of the JSON lines) and with rates rounded."""
    return {k: (rounded(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k != "token_ids"}


def copy_text(args: argparse.Namespace, words: int) -> str:
    """The first `words` words of the carried Grimm test split (a fixed sentence in --tiny or without data)."""
    path = Path(args.data or "") / "grimm-test.txt"
    if not args.tiny and path.is_file():
        text = " ".join(path.read_text(encoding="utf-8").split())
    else:
        text = "once upon a time there lived a king and a queen who had no children " * 20
    return " ".join(text.split()[:words])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="run this scenario (repeatable; default all)")
    p.add_argument("--tiny", action="store_true", help="tiny random models, few requests: every path on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "runtime_bench.jsonl")
    p.add_argument("--work", type=Path, default=None, help="folder for checkpoints made here (default: a temp dir)")
    p.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--smol-shape", default=None, help="a folder with SmolLM2's config and tokenizer: random weights "
                   "of that shape stand in for the GGUF's (speed rows only)")
    p.add_argument("--data", default=None, help="folder with wiki.valid.tokens (calibration) and grimm-test.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-prefill", choices=("on", "off"), default=None,
                   help="smollm2-run and prefix: prefill through the decode step's fused ops or not (default: the engine's)")
    p.add_argument("--short-prefill-rows", type=int, default=None,
                   help="smollm2-run and prefix: chunks of at most this many tokens run as decode rows through the "
                        "decode graphs (0: never; default: the engine's)")
    p.add_argument("--kv-cache", default="auto", choices=("auto", *KV_CACHE_KINDS),
                   help="smollm2-run: the engine's KV cache kind (auto: the model's dtype; q4 decodes through its own "
                        "decode step kernels)")
    p.add_argument("--calibration-samples", type=int, default=32, help="GPTQ calibration windows of 512 tokens")
    p.add_argument("--smol-new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--hf-requests", type=int, default=32)
    p.add_argument("--exl2-requests", type=int, default=4, help="ExLlamaV2 runs one at a time without flash-attn")
    p.add_argument("--skip-exllamav2", nargs="?", const="--skip-exllamav2", default=None, metavar="REASON",
                   help="do not run ExLlamaV2 (the reason goes into its row)")
    p.add_argument("--kv-gib", type=float, default=30.0, help="throughput: engine KV cache bytes")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--engine-budget-s", type=float, default=100.0, help="throughput: stop the engine run after this")
    p.add_argument("--exl2-budget-s", type=float, default=40.0)
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--kv-capacity-mib", type=float, default=1024)
    p.add_argument("--kv-capacity-seqs", type=int, default=8,
                   help="kv-capacity: max_num_seqs (a q4 cache stages one block of keys and values per sequence)")
    p.add_argument("--spec-config", default=None, help='EngineConfig settings that switch prompt-lookup on, as JSON')
    p.add_argument("--spec-words", type=int, default=250)
    p.add_argument("--spec-new-tokens", type=int, default=400)
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--decode-new-tokens", type=int, default=128)
    p.add_argument("--engine-decode-args", default="--repeats 2",
                   help="more arguments for bench/runtime/engine_decode.py, which decode-7b runs where it exists")
    p.add_argument("--engine-decode-timeout-s", type=float, default=140.0)
    p.add_argument("--fusion", default="on", choices=list(FUSION_SETTINGS),
                   help="smollm2-run and decode-7b: the engine's q/k/v and gate/up fused (on, its default), separate "
                        "(off), or both (an 'unfused' row after each fused one)")
    args = p.parse_args(argv)
    args.scenario = args.scenario or list(SCENARIOS)
    if args.tiny:
        args.requests = min(args.requests, 6)
        args.hf_requests = min(args.hf_requests, 3)
        args.new_tokens = min(args.new_tokens, 8)
        args.smol_new_tokens = min(args.smol_new_tokens, 8)
        args.prefix_requests = min(args.prefix_requests, 4)
        args.spec_new_tokens = min(args.spec_new_tokens, 12)
        args.spec_words = min(args.spec_words, 30)
        args.decode_new_tokens = min(args.decode_new_tokens, 6)
        args.kv_gib = min(args.kv_gib, 1 / 16)
        args.max_num_seqs = min(args.max_num_seqs, 64)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: pass --device cpu (with --tiny for a quick run)", file=sys.stderr)
        return 2
    record = Recorder(args.out, environment(device, sys.argv[1:] if argv is None else list(argv)), args.tiny)
    ctx = Context(args, record)
    print("| scenario | system | result |\n|---|---|---|", flush=True)
    failed = 0
    # the 7B-shaped scenarios share one model, built by the first of them that runs
    for name in [s for s in SCENARIOS if s in args.scenario]:
        began = time.perf_counter()
        try:
            SCENARIO_FUNCTIONS[name](ctx)
        except SkipScenario as why:
            record(name, "-", f"skipped: {why}", skipped=str(why))
        except Exception as exc:  # one scenario failing leaves the others to run; its row holds the trace
            failed += 1
            record(name, "-", f"failed: {type(exc).__name__}: {str(exc)[:300]}", error=traceback.format_exc()[-4000:])
        print(f"# {name}: {time.perf_counter() - began:.1f} s", flush=True)
    ctx.drop_llama()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
