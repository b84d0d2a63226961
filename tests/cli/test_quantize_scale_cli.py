"""`qtool quantize` for real-size jobs through the Typer app: --nproc, --jobs, --max-shard-size; refusals are
one line and exit 2 before any work."""

from __future__ import annotations

from typer.testing import CliRunner

from qtool.cli.main import app
from cli_checks import one_line_error

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["quantize", *args])


def test_nproc_refused_for_exl2_and_rtn(tmp_path, tiny_model_dir, calibration_text):
    common = [str(tiny_model_dir), "--calibration", str(calibration_text), "--samples", "2", "--seqlen", "16", "--output", str(tmp_path / "o")]
    assert "--nproc 2 applies to --format gptq only" in one_line_error(invoke(*common, "--format", "exl2", "--nproc", "2"))
    assert "--nproc 2 with method rtn" in one_line_error(invoke(*common, "--method", "rtn", "--nproc", "2"))
    assert not (tmp_path / "o").exists()


def write_jobs(tmp_path, model, calibration_text, extra: str = "") -> str:
    path = tmp_path / "jobs.yaml"
    path.write_text(f"""
defaults: {{method: rtn, group_size: 32}}
jobs:
  - {{model: {model}, output: {tmp_path / 'r4'}, bits: 4}}
  - {{model: {model}, output: {tmp_path / 'r8'}, bits: 8}}
{extra}compare: {{text: {calibration_text}, windows: 2, seqlen: 32}}
""")
    return str(path)


def test_jobs_run_table_then_json_rerun(tmp_path, tiny_model_dir, calibration_text):
    import json

    jobs = write_jobs(tmp_path, tiny_model_dir, calibration_text)
    first = invoke("--jobs", jobs, "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert "jobs of" in first.stdout and "quantized" in first.stdout and "recommended:" in first.stdout
    assert (tmp_path / "r4" / "model.safetensors").exists() and (tmp_path / "r8" / "model.safetensors").exists()
    again = invoke("--jobs", jobs, "--device", "cpu", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert [job["status"] for job in report["jobs"]] == ["skipped", "skipped"]
    assert [m["model"] for m in report["comparison"]["models"]] == [str(tmp_path / "r4"), str(tmp_path / "r8")]


def test_jobs_refusals_are_one_line(tmp_path, tiny_model_dir, calibration_text):
    jobs = write_jobs(tmp_path, tiny_model_dir, calibration_text)
    assert "--bits cannot be combined with --jobs" in one_line_error(invoke("--jobs", jobs, "--bits", "3"))
    assert "MODEL cannot be combined with --jobs" in one_line_error(invoke(str(tiny_model_dir), "--jobs", jobs))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"jobs:\n  - {{model: {tiny_model_dir}, output: {tmp_path / 'x'}}}\n  - {{model: {tiny_model_dir}, output: {tmp_path / 'y'}, group_size: 8}}\n")
    assert "jobs[1].group_size: 8 is not valid" in one_line_error(invoke("--jobs", str(bad)))
    assert "no model given" in one_line_error(invoke("--output", str(tmp_path / "z")))
    assert not (tmp_path / "x").exists()


def test_a_failed_job_exits_2_after_the_others(tmp_path, tiny_model_dir, calibration_text):
    jobs = write_jobs(tmp_path, tiny_model_dir, calibration_text, extra=f"  - {{model: {tmp_path / 'nothing'}, output: {tmp_path / 'n'}}}\n")
    result = invoke("--jobs", jobs, "--device", "cpu")
    line = one_line_error(result)
    assert "1 of 3 jobs failed; jobs[2]" in line and "not found" in line
    assert (tmp_path / "r4").exists() and (tmp_path / "r8").exists() and "recommended:" in result.stdout


def test_max_shard_size(tmp_path, tiny_model_dir, calibration_text):
    common = [str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--device", "cpu"]
    assert "--max-shard-size '5XB' is not a size" in one_line_error(invoke(*common, "--output", str(tmp_path / "x"), "--max-shard-size", "5XB"))
    result = invoke(*common, "--output", str(tmp_path / "s"), "--max-shard-size", "70kB")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "model.safetensors.index.json").exists() and not (tmp_path / "s" / "model.safetensors").exists()
    assert all(p.stat().st_size <= 70_000 + 10_000 for p in (tmp_path / "s").glob("*.safetensors"))  # cap + header
