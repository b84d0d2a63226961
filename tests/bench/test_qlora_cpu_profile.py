"""bench/finetune/qlora_cpu_profile.py --tiny: one QLoRA step on a tiny RTN-quantized llama is timed and profiled,
and the figures add up."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_bench_script


def test_tiny_profile_figures_add_up(tmp_path):
    script = load_bench_script("finetune/qlora_cpu_profile")
    figures = script.main(["--tiny", "--steps", "1", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == figures
    assert figures["quantized_linears"] == 14  # 2 decoder layers x 7 linears
    assert figures["tokens"] == 64 and figures["dtype"] == "float32"
    parts = figures["forward_seconds"] + figures["backward_seconds"] + figures["optimizer_seconds"]
    assert figures["step_seconds"] == pytest.approx(parts)
    assert figures["tokens_per_second"] == pytest.approx(64 / figures["step_seconds"])
    assert figures["dequant_share_of_step"] == pytest.approx(2 * figures["dequant_seconds"] / figures["step_seconds"])
    seconds = [op["self_seconds"] for op in figures["top_ops"]]
    assert seconds == sorted(seconds, reverse=True) and len(seconds) == script.TOP_OPS
    assert any(op["op"] == "aten::mm" for op in figures["top_ops"])
