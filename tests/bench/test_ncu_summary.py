"""bench/kernels/ncu_summary.py on a small export written here in Nsight Compute's source-page CSV layout: stall shares,
the instruction mix per weight value and the bank-conflict lines come out of the numbers put in."""

from pathlib import Path

from bench_scripts import load_bench_script

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
          "L1 Wavefronts Shared Excessive", "L1 Wavefronts Shared", "stall_long_sb", "stall_wait",
          "stall_long_sb (Not Issued)"]


def write_export(path: Path, rows: list[list[str]]) -> None:
    lines = ['"Kernel Name","gptq_gemm_left_kernel",', ",".join(f'"{h}"' for h in HEADER)]
    lines += [",".join(f'"{cell}"' for cell in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def test_summary_reports_the_counts_it_was_given(tmp_path):
    summary = load_bench_script("kernels/ncu_summary")
    export = tmp_path / "k.sass.csv"
    write_export(export, [
        ["0x10", "      LOP3.LUT R1, R2, 0xf, RZ, 0xc0, !PT", "30", "1,000", "0", "0", "30", "0", "30"],
        ["0x20", "@!P0  LDGSTS.E [R3], desc[UR4][R4.64]", "10", "250", "300", "400", "0", "10", "0"],
        ["0x30", "      FFMA R5, R6, R7, R8", "60", "1,000", "0", "0", "20", "40", "20"],
    ])
    text = summary.summarize(str(export), values=32 * 2250 // 9)  # 8000 values: 9 thread instructions each
    assert "100 samples over 3 instructions" in text
    assert "long_sb 50.0%" in text and "wait 50.0%" in text
    assert "9.00 thread instructions per weight value" in text
    assert "LOP3 4.00" in text and "FFMA 4.00" in text and "LDGSTS 1.00" in text
    assert "shared wavefronts 300 excessive of 400" in text
    first_hot = text.splitlines()[2]
    assert "60.0%" in first_hot and "FFMA" in first_hot and "wait" in first_hot


def test_summary_refuses_a_file_that_is_not_an_export(tmp_path, capsys):
    summary = load_bench_script("kernels/ncu_summary")
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert summary.main([str(other)]) == 1
    assert "not an ncu source export" in capsys.readouterr().err
