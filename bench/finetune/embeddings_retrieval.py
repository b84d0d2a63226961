"""Instruction -> answer retrieval on a held-out split of the Alpaca seed tasks, before and after contrastive
fine-tuning of all-MiniLM-L6-v2 (InfoNCE, in-batch negatives), on the CPU. One run per seed: the seed picks the
held-out rows, the batch order and dropout. Each query (the instruction, plus the task's input when it has one)
retrieves among the distinct answers of the held-out tasks.

Run from the repo root:
  PYTHONPATH=. python bench/finetune/embeddings_retrieval.py --epochs 3 --seeds 0,1,2 [--results out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from qtool.finetune.contrastive import train_embeddings

REPO = Path(__file__).resolve().parents[2]
SEED_TASKS = REPO.parent / "shared" / "data" / "alpaca-seed" / "seed_tasks.jsonl"
sys.path.insert(0, str(REPO / "bench"))  # bench/ holds scripts, not packages: its shared modules import by name
from run_metadata import git_commit  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all-minilm-l6-v2", help="alias or sentence-transformers directory")
    parser.add_argument("--data", default=str(SEED_TASKS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--similarity", default="cosine")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", default="0", help="comma-separated; one run (split, order, dropout) per seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=None, help="append one JSON line per run here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for seed in (int(part) for part in args.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="embeddings-bench-") as scratch:
            report = train_embeddings(args.model, args.data, Path(scratch) / "model", epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                                      batch_size=args.batch_size, temperature=args.temperature, similarity=args.similarity,
                                      eval_fraction=args.eval_fraction, seed=seed, device=args.device)
        row = {"seed": seed, **report.to_dict(), "settings": {k: v for k, v in vars(args).items() if k not in ("seeds", "results")},
               "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
               "commit": git_commit(short=True) or "unknown", "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        before, after = report.before, report.after
        print(f"seed {seed}: {report.eval_pairs} held-out queries, {after.documents} documents, {report.train_pairs} training pairs, "
              f"{report.steps} steps in {report.seconds:.0f} s | recall@1 {before.recall[1]:.3f} -> {after.recall[1]:.3f}, "
              f"recall@5 {before.recall[5]:.3f} -> {after.recall[5]:.3f}, MRR {before.mrr:.3f} -> {after.mrr:.3f}", flush=True)
        if args.results:
            with open(args.results, "a") as out:
                out.write(json.dumps(row) + "\n")
    if len(rows) > 1:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        for key, pick in (("recall@1", lambda m: m["recall"]["1"]), ("recall@5", lambda m: m["recall"]["5"]), ("MRR", lambda m: m["mrr"])):
            print(f"mean over {len(rows)} seeds: {key} {mean([pick(r['before']) for r in rows]):.3f} -> {mean([pick(r['after']) for r in rows]):.3f}")
    return rows


if __name__ == "__main__":
    run(parse_args())
