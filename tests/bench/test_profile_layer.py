"""bench/quantize/profile_layer.py on the CPU: one tiny layer quantized under torch's profiler gives the run's
timeline by group, every linear's solve from the run's reports and the top ops, as one JSON line."""

import json

from bench_scripts import BENCH, load_bench_script

WIKITEXT_VALID = BENCH.parents[1] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def profile_tiny_layer(tmp_path, tokenizer, *flags: str) -> dict:
    """profile_layer's row for one tiny layer on the CPU (2 samples of 32 tokens, float32), with `flags` added."""
    bench = load_bench_script("quantize/profile_layer")
    data = tmp_path / "data"
    data.mkdir()
    tokenizer.save_pretrained(str(data / "tokenizer"))
    (data / "wiki.valid.tokens").symlink_to(WIKITEXT_VALID)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--data", str(data), "--work", str(tmp_path / "work"), "--out", str(out), "--shape", "tiny",
                       "--layers", "1", "--samples", "2", "--seqlen", "32", "--device", "cpu", "--dtypes", "float32",
                       *flags]) == 0
    return json.loads(out.read_text())


def test_one_layer_profiled_on_the_cpu(tmp_path, make_tiny_tokenizer):
    row = profile_tiny_layer(tmp_path, make_tiny_tokenizer())
    details = [detail for _, detail in row["timeline"]]
    assert "layer 1/1 down_proj" in details and details.index("layer 1/1 q_proj+k_proj+v_proj") < details.index(
        "layer 1/1 down_proj")
    assert sorted(m["name"].rsplit(".", 1)[-1] for m in row["modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert all(m["solve_s"] >= 0 and m["damp"] >= 0.01 for m in row["modules"])
    assert any(op["name"] == "aten::mm" and op["calls"] > 0 for op in row["cpu_ops"])
    assert row["compute_dtype"] == "float32" and row["layers"] == 1


def test_without_the_profiler_the_timeline_and_its_peaks_still_come(tmp_path, make_tiny_tokenizer):
    row = profile_tiny_layer(tmp_path, make_tiny_tokenizer(), "--no-profiler")
    assert row["kernels"] == [] and row["cpu_ops"] == []
    assert len(row["peaks_gib"]) == len(row["timeline"]) > 0 and set(row["peaks_gib"]) == {None}  # no GPU here
    assert row["estimate"]["activation_tier"] == "host" and row["gpu_memory_bytes"] is None


def test_traced_cpu_peaks_see_the_hessians(tmp_path, make_tiny_tokenizer):
    """--trace-tensors on the CPU: every progress event gets the run's live-tensor peak, and the down_proj group's
    holds at least its Hessian's float64 sum ([intermediate, intermediate] x 8 bytes)."""
    row = profile_tiny_layer(tmp_path, make_tiny_tokenizer(), "--no-profiler", "--trace-tensors")
    assert all(isinstance(p, float) and p > 0 for p in row["peaks_gib"])
    assert row["traced_peak_gib"] == max(row["peaks_gib"])
    config = json.loads(next((tmp_path / "work").glob("*/config.json")).read_text())
    details = [detail for _, detail in row["timeline"]]
    # an event's peak is what the step before it held: the down_proj group's comes with the event after its own
    start = details.index("layer 1/1 down_proj")
    grew = row["peaks_gib"][start + 1] - row["traced_live_gib"][start]
    assert grew * 2**30 >= config["intermediate_size"] ** 2 * 8 - 2**12  # (figures rounded to the KiB)
