"""bench/finetune/qlora_linears.py --tiny on the CPU (kernels through the interpreter): one line per linear shape
with every timing positive and the dequant backend's forward equal to the dense one."""

import json

from bench_scripts import load_bench_script

TIMES = ("dense_forward_us", "dense_grad_input_us", "dequantize_us", "dequant_forward_us", "dequant_grad_input_us",
         "fused_lora_fwd_bwd_us", "peft_lora_fwd_bwd_us", "triton_forward_us", "triton_fwd_grad_input_us")


def test_tiny_run_writes_a_line_per_shape(tmp_path):
    bench = load_bench_script("finetune/qlora_linears")
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["linear"] for row in rows] == [name for name, _, _ in bench.TINY_LINEARS]
    for row in rows:
        assert all(row[key] > 0 for key in TIMES), row
        assert row["dequant_forward_rel_error"] < 1e-5  # float32 on the CPU
        assert "--tiny" in row["command"]
