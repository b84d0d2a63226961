"""bench/quantize/peer_quality.py on the CPU: the plan's wiring (each tool measures at the first EXL2 target and
reuses its own measurement after, both quantize the head at 6 bits, every output evaluated right after it is made,
--only keeping each output's evaluation), and the whole --tiny plan (slow): a float model, qtool's EXL2 curve and
GPTQ outputs evaluated by the same evaluator, the peers' rows saying why they did not run here."""

import json
from pathlib import Path

import pytest

from bench_scripts import BENCH, load_bench_script

SHARED = BENCH.parents[1] / "shared" / "data"


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("quantize/peer_quality")


def argument(step, flag):
    return step.argv[step.argv.index(flag) + 1] if flag in step.argv else None


def test_each_tool_measures_once_and_reuses_its_own_measurement(bench, tmp_path):
    steps = bench.plan_steps(tmp_path, tmp_path / "data", "m.gguf", tiny=False, device="cuda", sites={}, only=None)
    for tool, stage in (("qtool", "qtool"), ("ExLlamaV2", "exllamav2")):
        runs = [s for s in steps if s.stage == stage and s.facts["format"] == "exl2"]
        assert [s.facts["target"] for s in runs] == list(bench.EXL2_TARGETS)
        assert argument(runs[0], "--measurement") is None
        first_output = Path(argument(runs[0], "--output"))
        for later in runs[1:]:
            reused = Path(argument(later, "--measurement"))
            assert reused.name == "measurement.json"
            # qtool keeps it in its output; ExLlamaV2's converter in its working folder beside the output
            assert reused.parent == (first_output if stage == "qtool" else Path(f"{first_output}.work"))
    heads = {argument(s, "--head-bits") or argument(s, "--set") for s in steps if s.facts.get("format") == "exl2"
             and s.stage != "ppl"}
    assert heads == {"6", "head_bits=6"}
    gptq = [s for s in steps if s.stage in ("qtool", "gptqmodel") and s.facts["format"] == "gptq"]
    assert sorted((s.stage, s.facts["target"]) for s in gptq) == sorted(
        (stage, bits) for stage in ("qtool", "gptqmodel") for bits in bench.GPTQ_BITS)
    assert {argument(s, "--samples") for s in steps if s.stage != "ppl" and "--samples" in s.argv} == {"128"}


def test_every_output_is_evaluated_right_after_it_is_made(bench, tmp_path):
    steps = bench.plan_steps(tmp_path, tmp_path / "data", "m.gguf", tiny=False, device="cuda", sites={}, only=None)
    assert [s.stage for s in steps[:2]] == ["float", "ppl"]
    for maker, evaluation in zip(steps[2::2], steps[3::2]):
        assert evaluation.stage == "ppl" and evaluation.reads == argument(maker, "--output")
        assert argument(evaluation, "--windows") == "40" and argument(evaluation, "--seqlen") == "2048"
    only = bench.plan_steps(tmp_path, tmp_path / "data", "m.gguf", tiny=False, device="cuda", sites={}, only=["GPTQModel"])
    assert [s.row for s in only[2:]] == ["GPTQModel gptq 4-bit g128", "ppl of GPTQModel gptq 4-bit g128",
                                         "GPTQModel gptq 3-bit g128", "ppl of GPTQModel gptq 3-bit g128"]
    # a later call on the same machine keeps the float model the first call wrote
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "config.json").write_text("{}")
    (tmp_path / "float" / "model.safetensors").write_bytes(b"")
    later = bench.plan_steps(tmp_path, tmp_path / "data", "m.gguf", tiny=False, device="cuda", sites={}, only=["GPTQModel"])
    assert [s.stage for s in later] == ["gptqmodel", "ppl", "gptqmodel", "ppl"]


def test_the_table_pairs_each_output_with_the_run_that_made_it(bench):
    rows = [
        {"row": "qtool exl2 3 bpw", "stage": "qtool", "tool": "qtool", "format": "exl2", "target": 3.0, "seconds": 5.4,
         "measured": False},
        {"row": "ppl of qtool exl2 3 bpw", "stage": "ppl", "tool": "qtool", "format": "exl2", "target": 3.0,
         "ppl": 33.617, "bits_per_weight": 3.0201},
        {"row": "GPTQModel gptq 3-bit g128", "stage": "gptqmodel", "tool": "gptqmodel", "format": "gptq", "target": 3,
         "skipped": "gptqmodel is not importable here"},
        {"row": "ppl of GPTQModel gptq 3-bit g128", "stage": "ppl", "tool": "gptqmodel", "format": "gptq", "target": 3,
         "skipped": "gptqmodel-3 was not written"},
    ]
    lines = bench.markdown_table(rows).splitlines()
    assert lines[2] == "| qtool exl2 3 bpw | qtool | 3 bpw | 3.020 | 33.62 | 5.4 | (measurement reused) |"
    assert lines[3] == "| GPTQModel gptq 3-bit g128 | gptqmodel | 3-bit g128 |  |  |  | gptqmodel is not importable here |"


@pytest.mark.slow
def test_the_tiny_plan_runs_on_the_cpu(bench, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / bench.CALIBRATION_FILE).symlink_to(SHARED / "wikitext-2" / bench.CALIBRATION_FILE)
    (data / bench.EVAL_FILE).symlink_to(SHARED / "wikitext-2-raw" / bench.EVAL_FILE)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["plan", "--tiny", "--data", str(data), "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = {row["row"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows["ppl of float tiny"]["bits_per_weight"] == 16.0
    float_ppl = rows["ppl of float tiny"]["ppl"]
    for bpw in bench.EXL2_TARGETS:
        made, evaluated = rows[f"qtool exl2 {bpw:g} bpw"], rows[f"ppl of qtool exl2 {bpw:g} bpw"]
        assert made["measured"] is (bpw == bench.EXL2_TARGETS[0])
        assert abs(evaluated["bits_per_weight"] - bpw) < 0.05 and evaluated["ppl"] >= float_ppl * 0.99
        assert "CUDA" in rows[f"ExLlamaV2 exl2 {bpw:g} bpw"]["skipped"]
    # (no ordering of the widths' ppl: the tiny random model's ppl is about its vocabulary's size at every width, and
    # which one lands lower is rounding noise, bfloat16 forwards on a CPU with bf16 dot products included)
    for bits in bench.GPTQ_BITS:
        assert bits < rows[f"ppl of qtool gptq {bits}-bit g128"]["bits_per_weight"] < bits + 0.5
        peer = rows[f"GPTQModel gptq {bits}-bit g128"]
        assert "seconds" in peer or "gptqmodel" in peer["skipped"]
