"""bench/runtime/speculative_cpu.py on a tiny random Llama with a chat template: one line per task with the device,
date and command, plain and ngram speeds from the same run, target steps, drafts and acceptance, and ngram's tokens
equal to plain decoding's (the script's exit status says so too)."""

import json

from bench_scripts import load_bench_script


def test_every_task_has_a_line_with_equal_tokens(tmp_path, make_tiny_model_dir, make_tiny_tokenizer,
                                                 tiny_chat_template, tiny_words):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    make_tiny_tokenizer(chat_template=tiny_chat_template).save_pretrained(str(model_dir))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(tiny_words[i % len(tiny_words)] for i in range(400)))
    out = tmp_path / "rows.jsonl"
    bench = load_bench_script("runtime/speculative_cpu")
    assert bench.main(["--model", str(model_dir), "--text", str(text), "--words", "40", "--tokens", "12",
                       "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["task"] for row in rows] == list(bench.TASKS)
    for row in rows:
        assert row["identical"] and row["tokens"] == 12 and row["plain_steps"] >= 12
        assert row["plain_tok_s"] > 0 and row["ngram_tok_s"] > 0
        assert row["speedup"] == round(row["ngram_tok_s"] / row["plain_tok_s"], 3) or abs(
            row["speedup"] - row["ngram_tok_s"] / row["plain_tok_s"]) < 0.01
        assert 0 <= row["accepted"] <= row["drafted"] and row["device"].startswith("cpu")
        assert "speculative_cpu.py" in row["command"]
