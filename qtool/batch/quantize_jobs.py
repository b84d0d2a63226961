"""`qtool quantize --jobs FILE`: the jobs of a jobs file one after another, reusing across jobs of one model what
the math allows (qtool.quant.shared_calibration), a failed job reported while the others go on, a job whose output
is complete skipped (so the run resumes like one job: the interrupted job resumes from its saved layers), and
`eval --compare`'s table and recommendation over every output at the end.

It sits above quant/ and eval/ because it calls both."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from qtool.checkpoints.gptq_checkpoint import DEFAULT_MAX_SHARD_SIZE_BYTES
from qtool.config.jobs_file import JobsFile, QuantJob
from qtool.core.errors import QtoolError
from qtool.data.text import load_eval_text
from qtool.eval.compare import CompareResult, compare_models
from qtool.quant.exl2_pipeline import quantize_model_exl2
from qtool.quant.pipeline import quantize_model
from qtool.quant.shared_calibration import SharedCalibration

log = logging.getLogger(__name__)

# (job index from 0, jobs in all, layers done, layers in all, what is being worked on)
JobsProgress = Callable[[int, int, int, int, str], None]

QUANTIZED, SKIPPED, FAILED = "quantized", "skipped", "failed"


@dataclass
class JobOutcome:
    index: int
    model: str
    output: str
    format: str
    status: str  # quantized, skipped (its output was complete) or failed
    detail: str  # why it failed or was skipped; what it reused
    seconds: float
    result: dict[str, Any] | None = None  # the quantize result's to_dict()


@dataclass
class JobsRunResult:
    jobs_file: str
    jobs: list[JobOutcome]
    comparison: CompareResult | None = None
    comparison_note: str = ""  # why there is no comparison
    windows_reused: int = 0
    hessians_reused: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[JobOutcome]:
        return [job for job in self.jobs if job.status == FAILED]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["comparison"] = self.comparison.to_dict() if self.comparison else None
        return data


def finished_output(job: QuantJob) -> bool:
    """Whether the job's output is complete and was written with the job's config (outputs appear only when
    complete, and record the config they were made with)."""
    config_path = Path(job.output) / "config.json"
    if not config_path.is_file():
        return False
    try:
        written = json.loads(config_path.read_text()).get("quantization_config", {}).get("meta", {}).get("qtool_config")
    except (OSError, ValueError, AttributeError):
        return False
    return written == job.config.to_dict()


def _run_job(job: QuantJob, device: str, nproc: int, force: bool, discard_resume: bool, shared: SharedCalibration,
             progress: Callable[[int, int, str], None], max_shard_size_bytes: int,
             gpu_memory_bytes: int | None) -> dict[str, Any]:
    if job.config.output_format == "exl2":
        if nproc > 1:
            raise QtoolError(f"{job.where}: --nproc {nproc} applies to GPTQ jobs only", "run EXL2 jobs with --nproc 1")
        return quantize_model_exl2(job.model, job.config, job.output, device=device, force=force, progress=progress, discard_resume=discard_resume,
                                   max_shard_size_bytes=max_shard_size_bytes, gpu_memory_bytes=gpu_memory_bytes).to_dict()
    return quantize_model(job.model, job.config, job.output, device=device, force=force, progress=progress, discard_resume=discard_resume,
                          nproc=nproc, shared=shared if nproc == 1 else None, max_shard_size_bytes=max_shard_size_bytes,
                          gpu_memory_bytes=gpu_memory_bytes).to_dict()


def run_quantize_jobs(jobs_file: JobsFile, device: str = "auto", nproc: int = 1, force: bool = False, discard_resume: bool = False,
                      progress: JobsProgress | None = None, compare_device: str | None = None,
                      max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
                      gpu_memory_bytes: int | None = None) -> JobsRunResult:
    """Run every job of `jobs_file` in order and compare the outputs. A job whose output is complete with the same
    config is skipped (with force it is redone); a job that fails is reported and the next one starts. Only a
    failure to start (none here: the file was validated when read) stops the run."""
    report = progress or (lambda *args: None)
    shared = SharedCalibration()
    outcomes: list[JobOutcome] = []
    total = len(jobs_file.jobs)
    for job in jobs_file.jobs:
        started = time.perf_counter()
        fmt = job.config.output_format
        if not force and finished_output(job):
            outcomes.append(JobOutcome(job.index, job.model, job.output, fmt, SKIPPED, "its output is complete", 0.0))
            report(job.index, total, 1, 1, f"{job.output}: complete, skipped")
            continue
        windows_before, hessians_before = shared.windows_reused, shared.hessians_reused
        try:
            result = _run_job(job, device, nproc, force, discard_resume, shared,
                              lambda done, layers, detail="", index=job.index: report(index, total, done, layers, detail), max_shard_size_bytes,
                              gpu_memory_bytes)
        except QtoolError as exc:
            outcomes.append(JobOutcome(job.index, job.model, job.output, fmt, FAILED, exc.one_line(), time.perf_counter() - started))
            log.warning("%s (%s -> %s) failed: %s", job.where, job.model, job.output, exc.one_line())
            continue
        except (RuntimeError, ValueError, OSError, MemoryError) as exc:  # a bug or the machine: still, the next job runs
            outcomes.append(JobOutcome(job.index, job.model, job.output, fmt, FAILED, f"{type(exc).__name__}: {exc}", time.perf_counter() - started))
            log.exception("%s (%s -> %s) failed", job.where, job.model, job.output)
            continue
        reused = []
        if shared.windows_reused > windows_before:
            reused.append("calibration windows")
        if shared.hessians_reused > hessians_before:
            reused.append(f"{shared.hessians_reused - hessians_before} layer-0 Hessian(s)")
        detail = ("reused " + " and ".join(reused)) if reused else ""
        outcomes.append(JobOutcome(job.index, job.model, job.output, fmt, QUANTIZED, detail, time.perf_counter() - started, result))
    run = JobsRunResult(jobs_file.path, outcomes, windows_reused=shared.windows_reused, hessians_reused=shared.hessians_reused)
    _compare_outputs(run, jobs_file, compare_device or device, report)
    return run


def _compare_outputs(run: JobsRunResult, jobs_file: JobsFile, device: str, report: JobsProgress) -> None:
    """eval --compare over every output that exists, or a note saying why there is none."""
    outputs = [job.output for job in run.jobs if job.status != FAILED]
    if jobs_file.compare is None:
        run.comparison_note = "the jobs file turns the comparison off (compare: false)"
        return
    if len(outputs) < 2:
        run.comparison_note = f"{len(outputs)} output(s) to compare: the comparison needs two"
        return
    settings = jobs_file.compare
    total = len(run.jobs)
    try:
        text = load_eval_text(settings.text, option="compare.text")
        run.comparison = compare_models(outputs, text, seqlen=settings.seqlen, windows=settings.windows, device=device,
                                        progress=lambda done, count, detail="": report(total, total, done, count, f"compare: {detail}"))
    except QtoolError as exc:
        run.comparison_note = f"comparison failed: {exc.one_line()}"
