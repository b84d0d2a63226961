"""A batch of quantization jobs: jobs of one model share the calibration windows and layer 0's float-input
Hessians without changing a byte of what each writes; a failed job does not stop the others; a rerun skips
complete outputs; the run ends with eval --compare over the outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtool.batch.quantize_jobs import FAILED, QUANTIZED, SKIPPED, run_quantize_jobs
from qtool.config.jobs_file import read_jobs_file
from qtool.quant.pipeline import quantize_model


def checkpoint_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("model.safetensors", "config.json")}


@pytest.fixture
def jobs_path(tmp_path, make_tiny_model_dir, calibration_text) -> Path:
    model = make_tiny_model_dir(tmp_path / "model", seed=5)
    path = tmp_path / "jobs.yaml"
    path.write_text(f"""
defaults: {{calibration: {calibration_text}, samples: 6, seqlen: 32, group_size: 32}}
jobs:
  - {{model: {model}, output: {tmp_path / 'q4'}, bits: 4}}
  - {{model: {tmp_path / 'no-such-model'}, output: {tmp_path / 'never'}, bits: 4}}
  - {{model: {model}, output: {tmp_path / 'q3'}, bits: 3}}
  - {{model: {model}, output: {tmp_path / 'q4-flat'}, bits: 4, true_sequential: false}}
  - {{model: {model}, output: {tmp_path / 'q8-flat'}, bits: 8, true_sequential: false}}
compare: {{text: {calibration_text}, windows: 2, seqlen: 32}}
""")
    return path


def test_grid_shares_calibration_fails_alone_resumes_and_compares(tmp_path, jobs_path):
    jobs = read_jobs_file(jobs_path)
    seen: list[tuple[int, int, int, int, str]] = []
    run = run_quantize_jobs(jobs, device="cpu", progress=lambda *args: seen.append(args))
    assert [job.status for job in run.jobs] == [QUANTIZED, FAILED, QUANTIZED, QUANTIZED, QUANTIZED]
    assert "no-such-model" in run.jobs[1].detail and "not found" in run.jobs[1].detail
    # jobs 2-4 take the windows of job 0; job 2 its q/k/v Hessian (the only float input in true-sequential order);
    # job 3 (no true_sequential) needs all of layer 0's from the float layer and computes them, job 4 reuses all 4
    assert run.windows_reused == 3
    assert run.hessians_reused == 1 + 4
    assert "windows" in run.jobs[2].detail and "1 layer-0 Hessian" in run.jobs[2].detail and "4 layer-0" in run.jobs[4].detail
    # what a job writes does not depend on what it shares
    for index, name in ((2, "q3"), (4, "q8-flat")):
        alone = quantize_model(jobs.jobs[index].model, jobs.jobs[index].config, tmp_path / f"{name}-alone", device="cpu")
        assert alone.quantized_linears == run.jobs[index].result["quantized_linears"]
        assert checkpoint_bytes(tmp_path / name) == checkpoint_bytes(tmp_path / f"{name}-alone"), name
    # the comparison covers the four outputs, with perplexities and a recommendation
    compared = [report.model for report in run.comparison.models]
    assert compared == [str(tmp_path / n) for n in ("q4", "q3", "q4-flat", "q8-flat")]
    assert all(report.ppl > 1 for report in run.comparison.models) and run.comparison.recommendation
    assert any(args[0] == 2 and args[4].startswith("layer") for args in seen)  # job index and layer progress
    # a rerun skips what is complete and tries the failed job again
    again = run_quantize_jobs(jobs, device="cpu")
    assert [job.status for job in again.jobs] == [SKIPPED, FAILED, SKIPPED, SKIPPED, SKIPPED]
    assert again.comparison is not None and len(again.comparison.models) == 4
    assert again.to_dict()["jobs"][0]["status"] == SKIPPED
