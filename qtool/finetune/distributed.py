"""`qtool finetune --nproc N`: N processes of one torch.distributed group on this host (gloo on the CPU, NCCL
with one GPU per process), each running the same job on its share of every batch (trainer.py says why the loss
and gradients equal one process's). Rank 0 writes the output and reports progress through a queue."""

from __future__ import annotations

import os
import queue
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from qtool.checkpoints.sources import resolve_device
from qtool.core.errors import QtoolError
from qtool.finetune.job import FinetuneJob, FinetuneResult, run_finetune
from qtool.finetune.trainer import StepReport

POLL_SECONDS = 0.2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, job: FinetuneJob, world_size: int, port: int, threads: int, reports: Any, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    backend = "nccl" if resolve_device(job.device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        progress = reports.put if rank == 0 else None
        try:
            result = run_finetune(job, progress=progress, rank=rank, world_size=world_size)
        except QtoolError as exc:
            results.put((rank, "error", (exc.message, exc.hint)))
            raise SystemExit(2) from None
        if rank == 0:
            results.put((rank, "done", result))
    finally:
        dist.destroy_process_group()


def check_nproc(nproc: int, device: str) -> None:
    if nproc < 1:
        raise QtoolError(f"--nproc {nproc} is out of range", "use 1 or more processes")
    if resolve_device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise QtoolError(f"--nproc {nproc} needs {nproc} GPUs and this host has {torch.cuda.device_count()}",
                         f"use --nproc {torch.cuda.device_count()} or fewer")


def run_distributed(job: FinetuneJob, nproc: int, progress: Callable[[StepReport], None] | None = None) -> FinetuneResult:
    check_nproc(nproc, job.device)
    context = mp.get_context("spawn")
    reports, results = context.Queue(), context.Queue()
    # each process gets its share of the host's cores: N processes with all the threads each would thrash
    threads = max(1, (os.cpu_count() or 1) // nproc)
    processes = mp.start_processes(_worker, args=(job, nproc, free_port(), threads, reports, results), nprocs=nproc, join=False,
                                   start_method="spawn")
    outcome = None
    while True:
        try:
            report = reports.get(timeout=POLL_SECONDS)
            if progress is not None:
                progress(report)
            continue
        except queue.Empty:
            pass
        while outcome is None and not results.empty():
            outcome = results.get()
        if all(not p.is_alive() for p in processes.processes):
            break
    while outcome is None and not results.empty():
        outcome = results.get()
    while not reports.empty():
        report = reports.get()
        if progress is not None:
            progress(report)
    if outcome is not None and outcome[1] == "error":
        raise QtoolError(*outcome[2])
    if outcome is None or any(p.exitcode != 0 for p in processes.processes):
        codes = [p.exitcode for p in processes.processes]
        raise QtoolError(f"--nproc {nproc}: a training process failed (exit codes {codes})", "rerun with --debug, or with --nproc 1 to see its error")
    return outcome[2]
