"""bench/finetune/qlora_step.py --tiny on the CPU: one line per system with the device, versions and command, a
positive speed and finite losses; qtool's Triton and torch paths start from the same loss on the same random
GPTQ base (the Triton one through the interpreter here); bitsandbytes is measured or its row says why not; the
comparison line is qtool-triton's speed as a ratio of each other system's."""

import json
import math

import pytest

from bench_scripts import load_bench_script

ENV_KEYS = ("date", "device", "torch", "transformers", "peft", "command")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    bench = load_bench_script("finetune/qlora_step")
    out = tmp_path_factory.mktemp("qlora_step") / "rows.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--seqlen", "24", "--steps", "1"]) == 0
    return {row["system"]: row for row in map(json.loads, out.read_text().splitlines())}


def test_every_system_has_a_line_that_says_where_it_ran(rows):
    assert set(rows) == {"qtool-triton", "qtool-torch", "bnb-nf4", "comparison"}
    for row in rows.values():
        assert all(row.get(key) for key in ENV_KEYS), row
        assert "--tiny" in row["command"]


def test_measured_systems_report_speed_and_finite_losses(rows):
    for name in ("qtool-triton", "qtool-torch"):
        row = rows[name]
        assert row["tokens_per_s"] > 0 and row["trainable_params"] > 0
        assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])
    bnb = rows["bnb-nf4"]
    assert "tokens_per_s" in bnb or "bitsandbytes" in bnb["skipped"]


def test_both_qtool_paths_start_from_the_same_loss(rows):
    first = [rows[name]["losses"][0] for name in ("qtool-triton", "qtool-torch")]
    assert first[0] == pytest.approx(first[1], rel=1e-4)


def test_comparison_is_the_ratio_of_speeds(rows):
    expected = rows["qtool-triton"]["tokens_per_s"] / rows["qtool-torch"]["tokens_per_s"]
    assert rows["comparison"]["speed_vs_qtool-torch"] == pytest.approx(expected, rel=1e-2)
    assert abs(rows["comparison"]["first_loss_vs_qtool-torch"]) < 1e-3
