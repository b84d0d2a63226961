"""bench/finetune/qlora_step.py --tiny on the CPU: one line per system with the device, versions and command, a
positive speed and finite losses; qtool's dequant, Triton and torch paths start from the same loss on the same
random GPTQ base (dequant and Triton through the interpreter here); bitsandbytes is measured or its row says why
not; the comparison line is qtool-fused's speed as a ratio of each other system's; --profile writes each
system's step by category, and on the dequant path counts one dequantize per linear in the forward, the
checkpoint's recompute and the backward."""

import json
import math

import pytest

from bench_scripts import load_bench_script

STEP_CATEGORIES = load_bench_script("finetune/step_profile").CATEGORIES

ENV_KEYS = ("date", "device", "torch", "transformers", "peft", "command")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    bench = load_bench_script("finetune/qlora_step")
    out = tmp_path_factory.mktemp("qlora_step") / "rows.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--seqlen", "24", "--steps", "1",
                       "--profile", str(out.with_name("profile.json"))]) == 0
    return out, out.with_name("profile.json")


@pytest.fixture(scope="module")
def rows(outputs):
    return {row["system"]: row for row in map(json.loads, outputs[0].read_text().splitlines())}


@pytest.fixture(scope="module")
def profile(outputs):
    return json.loads(outputs[1].read_text())


def test_every_system_has_a_line_that_says_where_it_ran(rows):
    assert set(rows) == {"qtool-fused", "qtool-dequant", "qtool-triton", "qtool-torch", "bnb-nf4", "comparison"}
    for row in rows.values():
        assert all(row.get(key) for key in ENV_KEYS), row
        assert "--tiny" in row["command"]


def test_measured_systems_report_speed_and_finite_losses(rows):
    for name in ("qtool-fused", "qtool-dequant", "qtool-triton", "qtool-torch"):
        row = rows[name]
        assert row["tokens_per_s"] > 0 and row["trainable_params"] > 0
        assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])
    bnb = rows["bnb-nf4"]
    assert "tokens_per_s" in bnb or "bitsandbytes" in bnb["skipped"]


def test_the_qtool_paths_start_from_the_same_loss(rows):
    first = [rows[name]["losses"][0] for name in ("qtool-dequant", "qtool-triton", "qtool-fused", "qtool-torch")]
    assert all(loss == pytest.approx(first[-1], rel=1e-4) for loss in first)
    assert rows["qtool-fused"]["forward"].startswith("fused training forward")


def test_profile_splits_each_step_into_categories_that_add_up(rows, profile):
    assert set(profile["systems"]) == {"qtool-fused", "qtool-dequant", "qtool-triton", "qtool-torch"} | (
        set() if "skipped" in rows["bnb-nf4"] else {"bnb-nf4"})
    assert profile["rank"] == 16 and "--tiny" in profile["command"]
    for name, summary in profile["systems"].items():
        categories = summary["categories"]
        assert list(categories) == list(STEP_CATEGORIES)
        assert sum(c["us"] for c in categories.values()) == pytest.approx(summary["kernel_us"], abs=0.1 * len(categories))
        assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0, abs=1e-3)
        # every system's step has base and LoRA matmuls, attention, the loss and the optimizer
        for category in ("base_gemm", "lora_gemm", "attention", "loss", "optimizer", "elementwise"):
            assert categories[category]["count"] > 0, (name, category)
        assert 0 < summary["busy_us"] <= summary["wall_us"] and len(summary["top_kernels"]) <= 20
        assert rows[name]["profile_busy_share"] == summary["busy_share"]


def test_dequantizing_paths_dequantize_each_linear_three_times_a_step(profile):
    """forward, the checkpoint's recompute and the backward: 2 layers x 7 linears x 3; the Triton path's GEMM and
    grad-input kernels dequantize inside, with no range."""
    systems = profile["systems"]
    assert (systems["qtool-dequant"]["dequantizations"] == systems["qtool-torch"]["dequantizations"]
            == systems["qtool-fused"]["dequantizations"] == 2 * 7 * 3)
    assert systems["qtool-dequant"]["categories"]["dequant"]["us"] > 0
    assert systems["qtool-triton"]["dequantizations"] == 0


def test_comparison_is_the_ratio_of_speeds(rows):
    assert rows["comparison"]["ours"] == "qtool-fused"
    expected = rows["qtool-fused"]["tokens_per_s"] / rows["qtool-torch"]["tokens_per_s"]
    assert rows["comparison"]["speed_vs_qtool-torch"] == pytest.approx(expected, rel=1e-2)
    assert abs(rows["comparison"]["first_loss_vs_qtool-torch"]) < 1e-3
