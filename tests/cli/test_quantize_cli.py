"""`qtool quantize` through the Typer app: flags reach the config, a config file is overridden by flags, bad
options fail with one line and exit 2 before any work, --json is machine-readable, --force guards outputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["quantize", *args])


def test_help_lists_every_flag_of_the_contract():
    result = runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0
    for flag in ("--bits", "--group-size", "--method", "--desc-act", "--sym", "--no-sym", "--static-groups", "--true-sequential",
                 "--no-true-sequential", "--damp", "--mse", "--calibration", "--samples", "--seqlen", "--seed", "--config",
                 "--device", "--force", "--json", "--output"):
        assert flag in result.output, flag


def test_json_run_writes_checkpoint_with_the_flags(tmp_path, tiny_model_dir, calibration_text):
    out = tmp_path / "out"
    result = invoke(str(tiny_model_dir), "--bits", "3", "--group-size", "64", "--no-sym", "--desc-act", "--damp", "0.02",
                    "--calibration", str(calibration_text), "--samples", "4", "--seqlen", "32", "--seed", "3",
                    "--output", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["bits"] == 3 and report["config"]["sym"] is False and report["config"]["desc_act"] is True
    assert report["config"]["damp_percent"] == 0.02 and report["config"]["calibration"]["seed"] == 3
    assert report["quantized_linears"] == 14 and report["layers"] == 2
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (written["bits"], written["group_size"], written["sym"], written["desc_act"]) == (3, 64, False, True)


def test_config_file_is_overridden_by_flags(tmp_path, tiny_model_dir, calibration_text):
    config = tmp_path / "job.yaml"
    config.write_text(f"bits: 8\ngroup_size: 32\ncalibration:\n  source: {calibration_text}\n  samples: 4\n  seqlen: 32\n")
    result = invoke(str(tiny_model_dir), "--config", str(config), "--bits", "2", "--output", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["config"]["bits"], report["config"]["group_size"], report["config"]["calibration"]["samples"]) == (2, 32, 4)


def test_table_output_and_force(tmp_path, tiny_model_dir, calibration_text):
    out = tmp_path / "out"
    common = [str(tiny_model_dir), "--calibration", str(calibration_text), "--samples", "4", "--seqlen", "32", "--output", str(out)]
    first = invoke(*common)
    assert first.exit_code == 0, first.output
    assert "quantized into" in first.output
    again = invoke(*common)
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    forced = invoke(*common, "--force", "--method", "rtn")
    assert forced.exit_code == 0, forced.output


# A value outside an option's choices (--bits 5, --method gtpq, --checkpoint-format v3) is refused by Typer
# before the command runs: test_choices.py; so is a count below its minimum (--samples 0): test_early_refusal.py.
@pytest.mark.parametrize(
    "args,message",
    [
        (["--group-size", "8"], "group_size"),
        (["--damp", "1.5"], "damp_percent"),
        (["--seqlen", "4"], "seqlen"),
        (["--calibration", "/no/such/file.txt"], "/no/such/file.txt"),
        (["--config", "/no/such/config.yaml"], "config.yaml"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, args, message):
    # the model path does not exist: reaching the model at all would give a different error
    result = invoke(str(tmp_path / "no-model"), "--output", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_model_is_one_line(tmp_path):
    result = invoke(str(tmp_path / "no-model"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no-model" in result.output and "Traceback" not in result.output
