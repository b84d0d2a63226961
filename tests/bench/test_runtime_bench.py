"""bench/runtime/runtime_bench.py --tiny on the CPU, every scenario in one run: each writes its JSON lines (with the
device, versions, commit, command and date), the engine's greedy tokens equal transformers' on the same model,
every system generates exactly the tokens asked, the prefix scenario skips what the block arithmetic says it can,
and a scenario whose engine feature is absent says so instead of failing."""

import dataclasses
import json

import pytest

from bench_scripts import load_bench_script

ENV_KEYS = ("date", "device", "torch", "transformers", "git_commit", "command")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    bench = load_bench_script("runtime/runtime_bench")
    work = tmp_path_factory.mktemp("runtime_bench")
    out = work / "rows.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--work", str(work / "work")]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return bench, lines


def by_system(lines, scenario):
    return {row["system"]: row for row in lines if row["scenario"] == scenario}


def test_every_line_says_where_and_how_it_ran(rows):
    bench, lines = rows
    assert {row["scenario"] for row in lines} >= set(bench.SCENARIOS)
    for row in lines:
        assert all(row.get(key) for key in ENV_KEYS if key != "git_commit"), row
        assert "--tiny" in row["command"] and row["tiny"] is True
        assert "error" not in row or row["system"] == "exllamav2 dynamic", row


def test_smollm2_run_engine_equals_generate_and_counts_tokens(rows):
    _, lines = rows
    found = by_system(lines, "smollm2-run")
    assert set(found) == {"engine gptq-4bit", "hf-generate gptq-4bit", "engine float", "hf-generate float"}
    for variant in ("gptq-4bit", "float"):
        engine, hf = found[f"engine {variant}"], found[f"hf-generate {variant}"]
        assert engine["same_tokens_as_hf"] is True
        assert engine["output_tokens"] == hf["output_tokens"] == 8
        assert engine["output_tok_s"] > 0 and hf["output_tok_s"] > 0


def test_throughput_counts_what_each_system_generated(rows):
    _, lines = rows
    found = by_system(lines, "throughput")
    engine, hf = found["engine"], found["hf-generate (padded batch)"]
    assert engine["complete"] and engine["finished"] == engine["requests"] == 6
    assert engine["output_tokens"] == 6 * 8 and len(engine["prompt_lengths"]) == 6
    assert hf["requests"] == 3 and hf["output_tokens"] == 3 * 8
    # both numbers are written rounded to 3 decimals: their product is off by up to 0.0005 of each (a fast CPU's
    # wall_s of 0.049 s alone moves it by 1%)
    rounding = 0.0005 * (hf["output_tok_s"] + hf["wall_s"]) + 1e-6
    assert abs(hf["output_tok_s"] * hf["wall_s"] - hf["output_tokens"]) <= rounding
    assert "needs CUDA" in found["exllamav2 dynamic"]["summary"]


def test_prefix_skips_every_full_block_of_the_shared_prefix(rows):
    _, lines = rows
    row = by_system(lines, "prefix")["engine"]
    shared, block = row["shared_prefix_tokens"], 16
    # the others reuse each full block of the prefix; the partial last one is recomputed with their suffix
    assert row["prefill_skipped"] == pytest.approx((shared // block) * block / shared)
    assert len(row["ttft_others_s"]) == row["requests"] - 1 == len(row["ttft_batched_s"])
    assert row["ttft_first_s"] > 0


def test_kv_capacity_rows_or_a_note(rows):
    bench, lines = rows
    found = by_system(lines, "kv-capacity")
    if "kv_cache" not in {f.name for f in dataclasses.fields(bench.engine_config().__class__)}:
        assert "no kv_cache field" in found["-"]["summary"]
        return
    fp16, q8, q4 = (found[f"engine kv_cache={kind}"] for kind in ("fp16", "q8", "q4"))
    assert fp16["capacity_tokens"] < q8["capacity_tokens"] < q4["capacity_tokens"]
    for row in (fp16, q8, q4):
        assert row["stats"]["preemptions"] == 0
        assert row["peak_tokens_held"] == row["fill_requests"] * (row["fill_prompt_tokens"] + 2) <= row["capacity_tokens"]


def test_speculative_row_or_a_note(rows):
    _, lines = rows
    found = by_system(lines, "speculative")
    if "-" in found:
        assert found["-"]["summary"].startswith("skipped:")
        return
    assert found["engine prompt-lookup"]["same_tokens_as_plain"] is True


def test_decode_7b_measures_both_variants(rows):
    _, lines = rows
    found = by_system(lines, "decode-7b")
    for label in ("engine float32", "engine gptq-4bit"):
        assert found[label]["output_tokens"] == 6 and found[label]["context_tokens"] == 64
        assert found[label]["decode_tok_s_mean"] > 0
