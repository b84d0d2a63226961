"""bench/serve/serve_bench.py --tiny on the CPU: both systems run the same workload in one run, every HTTP client
gets all its tokens, the rows carry the device and the run's facts, and the ratio is the two measured rates'."""

import json

import pytest

from bench_scripts import load_bench_script

ENV_KEYS = ("date", "device", "torch", "transformers", "command")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    bench = load_bench_script("serve/serve_bench")
    work = tmp_path_factory.mktemp("serve_bench")
    out = work / "rows.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--work", str(work / "work")]) == 0
    return bench, [json.loads(line) for line in out.read_text().splitlines()]


def test_offline_and_http_run_the_same_workload(rows):
    _, lines = rows
    found = {row["system"]: row for row in lines if row["scenario"] == "serve"}
    offline, http = found["engine offline"], found["http serve (12 clients)"]
    for row in (offline, http):
        assert all(row.get(key) for key in ENV_KEYS), row
        assert row["tiny"] is True and "--tiny" in row["command"]
        assert row["requests"] == 12 and row["new_tokens"] == 8
    assert offline["output_tokens"] == http["output_tokens"] == 12 * 8
    assert http["complete"] and http["failed"] == 0 and http["engine_generated_tokens"] == 12 * 8
    assert offline["prompt_tokens"] == http["prompt_tokens"]
    assert http["ratio_to_offline"] == pytest.approx(http["output_tok_s"] / offline["output_tok_s"], rel=1e-2)
    for row in (offline, http):
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert http["peak_running"] > 1  # the clients really shared the batch


def test_percentile_matches_the_order_statistics(rows):
    bench, _ = rows
    import random

    values = [random.random() for _ in range(101)]
    ordered = sorted(values)
    assert bench.percentile(values, 0.5) == ordered[50]
    assert bench.percentile(values, 0.99) == pytest.approx(ordered[99])
    assert bench.percentile([3.0], 0.99) == 3.0 and bench.percentile([], 0.5) is None
