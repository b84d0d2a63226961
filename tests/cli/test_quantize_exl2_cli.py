"""`qtool quantize --format exl2` through the Typer app: the flags reach the shared config, the checkpoint is
EXL2 at the asked bpw and `qtool eval` reads it, a measurement is reused, and flags that only GPTQ reads, or
that contradict each other, fail with one line before any work."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app

runner = CliRunner()


def quantize(*args: str):
    return runner.invoke(app, ["quantize", *args])


def test_help_lists_the_exl2_flags():
    result = runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0
    for flag in ("--format", "--bpw", "--head-bits", "--measurement", "--target-vram", "--context-length"):
        assert flag in result.output, flag


def test_exl2_run_writes_a_checkpoint_that_eval_reads(tmp_path, tiny_model_dir, calibration_text):
    out = tmp_path / "exl2"
    common = ["--calibration", str(calibration_text), "--samples", "4", "--seqlen", "32"]
    result = quantize(str(tiny_model_dir), "--format", "exl2", "--bpw", "3.5", "--head-bits", "8", *common, "--output", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["output_format"] == "exl2" and report["config"]["bpw"] == 3.5 and report["config"]["head_bits"] == 8
    assert abs(report["bits_per_weight"] - 3.5) <= 0.02 and report["measured"] is True
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (written["quant_method"], written["bits"], written["head_bits"]) == ("exl2", 3.5, 8)
    assert (out / "measurement.json").exists()

    evaluated = runner.invoke(app, ["eval", str(out), "--perplexity", str(calibration_text), "--seqlen", "32", "--windows", "2", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] > 1

    # another bpw from the same measurement, with the table output
    again = quantize(str(tiny_model_dir), "--format", "exl2", "--bpw", "5", "--measurement", str(out / "measurement.json"), *common,
                     "--output", str(tmp_path / "exl2-5"))
    assert again.exit_code == 0, again.output
    assert "reused from --measurement, with its sensitivities" in again.stdout and "bits per weight" in again.stdout


# --head-bits 4 and --format exl3 are outside the options' choices, refused by Typer: test_choices.py.
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--format", "exl2", "--bits", "4"], "--bits does not apply to --format exl2"),
        (["--format", "exl2", "--group-size", "64"], "--group-size does not apply to --format exl2"),
        (["--format", "exl2", "--bpw", "3", "--target-vram", "8"], "--bpw and --target-vram both choose"),
        (["--format", "exl2", "--bpw", "1.5"], "bpw: 1.5 is out of range"),
        (["--measurement", "m.json"], "--measurement applies to --format exl2 only"),
        (["--target-vram", "8"], "target_vram_gb: applies to EXL2 output only"),
    ],
)
def test_bad_exl2_flags_fail_before_any_work(tmp_path, tiny_model_dir, flags, message):
    out = tmp_path / "out"
    result = quantize(str(tiny_model_dir), *flags, "--output", str(out))
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
