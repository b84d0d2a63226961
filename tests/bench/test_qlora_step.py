"""bench/finetune/qlora_step.py --tiny on the CPU: one line per system with the device, versions and command, a
positive speed and finite losses; qtool's dequant, Triton and torch paths start from the same loss on the same
random GPTQ base (dequant and Triton through the interpreter here); bitsandbytes is measured or its row says why
not; the comparison line is qtool-dequant's speed as a ratio of each other system's; --profile writes each
system's table of ops."""

import json
import math
from pathlib import Path

import pytest

from bench_scripts import load_bench_script

ENV_KEYS = ("date", "device", "torch", "transformers", "peft", "command")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    bench = load_bench_script("finetune/qlora_step")
    out = tmp_path_factory.mktemp("qlora_step") / "rows.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--seqlen", "24", "--steps", "1",
                       "--profile"]) == 0
    return {row["system"]: row for row in map(json.loads, out.read_text().splitlines())}


def test_every_system_has_a_line_that_says_where_it_ran(rows):
    assert set(rows) == {"qtool-dequant", "qtool-triton", "qtool-torch", "bnb-nf4", "comparison"}
    for row in rows.values():
        assert all(row.get(key) for key in ENV_KEYS), row
        assert "--tiny" in row["command"]


def test_measured_systems_report_speed_and_finite_losses(rows):
    for name in ("qtool-dequant", "qtool-triton", "qtool-torch"):
        row = rows[name]
        assert row["tokens_per_s"] > 0 and row["trainable_params"] > 0
        assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])
    bnb = rows["bnb-nf4"]
    assert "tokens_per_s" in bnb or "bitsandbytes" in bnb["skipped"]


def test_the_qtool_paths_start_from_the_same_loss(rows):
    first = [rows[name]["losses"][0] for name in ("qtool-dequant", "qtool-triton", "qtool-torch")]
    assert first[0] == pytest.approx(first[2], rel=1e-4) and first[1] == pytest.approx(first[2], rel=1e-4)


def test_profile_tables_name_the_ops(rows):
    for name in ("qtool-dequant", "qtool-torch"):
        table = Path(rows[name]["profile"]).read_text()
        assert "aten::" in table and "Self CPU" in table


def test_comparison_is_the_ratio_of_speeds(rows):
    assert rows["comparison"]["ours"] == "qtool-dequant"
    expected = rows["qtool-dequant"]["tokens_per_s"] / rows["qtool-torch"]["tokens_per_s"]
    assert rows["comparison"]["speed_vs_qtool-torch"] == pytest.approx(expected, rel=1e-2)
    assert abs(rows["comparison"]["first_loss_vs_qtool-torch"]) < 1e-3
