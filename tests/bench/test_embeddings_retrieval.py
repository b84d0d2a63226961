"""bench/finetune/embeddings_retrieval.py end to end on a tiny random model (the real MiniLM run is the bench's job):
one JSON line per seed with the held-out split of the seed tasks, before and after."""

from __future__ import annotations

import json

from bench_scripts import load_bench_script
from tiny_embedding_model import save_tiny_sentence_model


def test_one_row_per_seed_on_the_seed_tasks(tmp_path, capsys):
    bench = load_bench_script("finetune/embeddings_retrieval")
    model = save_tiny_sentence_model(tmp_path / "tiny")
    results = tmp_path / "runs.jsonl"
    rows = bench.run(bench.parse_args(["--model", str(model), "--max-steps", "2", "--batch-size", "8", "--seeds", "0,1", "--results", str(results)]))
    assert [row["seed"] for row in rows] == [0, 1] and [json.loads(line)["seed"] for line in results.read_text().splitlines()] == [0, 1]
    for row in rows:
        assert (row["steps"], row["eval_pairs"], row["train_pairs"]) == (2, 35, 140) and 34 <= row["after"]["documents"] <= 35  # one answer ("false") is given twice
    assert "mean over 2 seeds: recall@1" in capsys.readouterr().out
