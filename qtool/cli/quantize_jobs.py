"""`qtool quantize --jobs FILE`: the jobs file read and validated before any work, a bar saying job i of N and
layer i of N, a table of the jobs, then `eval --compare`'s table and recommendation (or all of it as --json)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from qtool.cli.eval import compare_table
from qtool.cli.render import print_findings, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError

if TYPE_CHECKING:
    from qtool.batch.quantize_jobs import JobsRunResult


def jobs_table(result: JobsRunResult) -> Table:
    table = Table(title=f"jobs of {result.jobs_file}")
    for column in ("job", "model", "output", "format", "status", "time", "detail"):
        table.add_column(column, overflow="fold")
    for job in result.jobs:
        status = {"failed": "[red]failed[/]", "skipped": "[dim]skipped[/]"}.get(job.status, job.status)
        table.add_row(str(job.index), job.model, job.output, job.format, status, f"{job.seconds:.1f} s", job.detail)
    return table


def run_jobs_command(jobs: str, device: str, nproc: int, force: bool, discard_resume: bool, as_json: bool, max_shard_size_bytes: int,
                     gpu_memory_bytes: int | None = None) -> None:
    from qtool.batch.quantize_jobs import run_quantize_jobs
    from qtool.config.jobs_file import read_jobs_file

    jobs_file = read_jobs_file(jobs)
    if not as_json:
        for job in jobs_file.jobs:
            print_findings(job.findings)
    with progress_bar("quantize", enabled=not as_json) as update:
        def progress(index: int, total: int, done: int, layers: int, detail: str) -> None:
            where = f"job {index + 1}/{total}" if index < total else "compare"
            update(done, layers, f"{where} {detail}")

        result = run_quantize_jobs(jobs_file, device=device, nproc=nproc, force=force, discard_resume=discard_resume, progress=progress,
                                   max_shard_size_bytes=max_shard_size_bytes, gpu_memory_bytes=gpu_memory_bytes)
    if as_json:
        print_json(result.to_dict())
    else:
        stdout.print(jobs_table(result))
        if result.comparison is not None:
            stdout.print(compare_table(result.comparison))
            stdout.print(f"recommended: {result.comparison.recommendation}")
        elif result.comparison_note:
            stderr.print(f"no comparison: {result.comparison_note}")
    if result.failed:
        first = result.failed[0]
        raise QtoolError(f"{len(result.failed)} of {len(result.jobs)} jobs failed; jobs[{first.index}]: {first.detail}",
                         "the other outputs are written; fix the failed jobs and rerun the file (complete outputs are skipped)")
