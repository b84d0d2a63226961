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
