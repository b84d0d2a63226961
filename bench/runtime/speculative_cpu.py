"""Prompt-lookup speculative decoding on the CPU, plain greedy decoding as the baseline in the same run: a model
(default SmolLM2 GPTQ 4-bit g128, `make demo`'s output) answers three chat prompts over one Grimm passage, each
with --tokens greedy tokens, plain and ngram alternating --repeats times:

  copy   "Repeat the following text exactly": the reply is the passage, so drafts from the prompt should land
  edit   "Rewrite the text, changing ... and keep everything else": mostly the passage again, with small changes
  poem   "Write a short poem about the sea": nothing to copy from the prompt (a small model's reply repeats
         itself, which prompt lookup also drafts from)
  facts  "Who was Napoleon Bonaparte?": nothing to copy and little repetition, so acceptance is low; the adaptive
         draft length must keep ngram from being slower than plain

Per task: tokens/s of each mode (median over repeats), the ratio, target forward steps, drafted and accepted
tokens, and whether the tokens equal plain decoding's (they must: greedy speculation is exact). One JSON line per
task to --out (with the device, date, command), and a table on stdout.

Run from the repo root: PYTHONPATH=. python bench/runtime/speculative_cpu.py [--model DIR] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TASKS = {
    "copy": "Repeat the following text exactly, word for word:\n\n{passage}",
    "edit": "Rewrite the following text, changing every 'king' to 'queen' and every 'he' to 'she', and keep "
            "everything else exactly as it is:\n\n{passage}",
    "poem": "Write a short poem about the sea.",
    "facts": "Who was Napoleon Bonaparte?",
}


def run_once(model, tokenizer, prompt: str, tokens: int, speculative: bool) -> dict:
    from qtool.runtime.engine import Engine, EngineConfig, SamplingParams

    config = EngineConfig(speculative="ngram", num_speculative_tokens=6) if speculative else EngineConfig()
    engine = Engine(model, tokenizer, config)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    out = engine.generate(prompt, params)[0]
    seconds = time.perf_counter() - started
    stats = engine.stats().to_dict()
    speculation = next(iter(stats.get("speculation", {}).values()), {})
    return {"token_ids": list(out.token_ids), "tok_s": len(out.token_ids) / seconds, "steps": stats["steps"],
            "drafted": speculation.get("drafted", 0), "accepted": speculation.get("accepted", 0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "out" / "smollm2-gptq-4bit"))
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "grimm" / "test.txt"))
    p.add_argument("--words", type=int, default=130, help="words of the passage (from word 200 of --text)")
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from qtool.checkpoints.sources import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    passage = " ".join(Path(args.text).read_text().split()[200 : 200 + args.words])
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": f"cpu ({platform.machine()}, "
           f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "model": args.model,
           "command": " ".join(["python", Path(__file__).resolve().relative_to(REPO).as_posix(),
                                *(sys.argv[1:] if argv is None else argv)])}
    rows = []
    for task in args.tasks.split(","):
        messages = [{"role": "user", "content": TASKS[task].format(passage=passage)}]
        prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        runs = {"plain": [], "ngram": []}
        for _ in range(args.repeats):  # alternating, so a slow spell of the shared machine hits both modes
            for mode in runs:
                runs[mode].append(run_once(loaded.model, loaded.tokenizer, prompt, args.tokens, mode == "ngram"))
        plain, ngram = runs["plain"][0], runs["ngram"][0]
        speed = {mode: statistics.median(r["tok_s"] for r in done) for mode, done in runs.items()}
        row = env | {"task": task, "tokens": len(plain["token_ids"]), "plain_tok_s": round(speed["plain"], 2),
                     "ngram_tok_s": round(speed["ngram"], 2), "speedup": round(speed["ngram"] / speed["plain"], 3),
                     "plain_steps": plain["steps"], "ngram_steps": ngram["steps"], "drafted": ngram["drafted"],
                     "accepted": ngram["accepted"],
                     "acceptance": round(ngram["accepted"] / ngram["drafted"], 3) if ngram["drafted"] else 0.0,
                     "identical": all(r["token_ids"] == plain["token_ids"] for done in runs.values() for r in done),
                     "tok_s_runs": {mode: [round(r["tok_s"], 2) for r in done] for mode, done in runs.items()}}
        rows.append(row)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print("| task | plain tok/s | ngram tok/s | speed-up | target steps plain -> ngram | acceptance | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['plain_tok_s']} | {r['ngram_tok_s']} | {r['speedup']}x | {r['plain_steps']} -> "
              f"{r['ngram_steps']} | {r['accepted']}/{r['drafted']} ({r['acceptance']:.0%}) | {r['identical']} |")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
