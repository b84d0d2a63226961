"""Several processes quantizing one model together (`qtool quantize --nproc N`): what one process needs to know
about the others (its rank, the group's collectives), and the launch of N processes the way torchrun starts them
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in each one's environment; gloo on the CPU, nccl on GPUs).

The calibration batches are split across the processes; the Hessians are summed over them, each GPTQ solve runs
on rank 0 and its result is broadcast, and rank 0 alone writes. torch.distributed is the engine; this module
only names what the pipeline asks of it."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from qtool.core.errors import QtoolError

log = logging.getLogger(__name__)

# How long a process waits for the others in one collective before giving up (a peer that died is noticed by
# the launcher first, which stops the rest).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Collective:
    """This process's place in the group. The single-process group (world_size 1) makes every collective a
    no-op, so the pipeline has one code path."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where tensors travel: cuda for nccl, cpu for gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _through_device(self, tensor: torch.Tensor, op: Callable[[torch.Tensor], None]) -> None:
        if tensor.device == self.device and tensor.is_contiguous():
            op(tensor)
            return
        moved = tensor.to(self.device).contiguous()
        op(moved)
        tensor.copy_(moved)

    def sum_(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` by its sum over the processes."""
        if self.world_size > 1:
            import torch.distributed as dist

            self._through_device(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def max_(self, tensor: torch.Tensor) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            self._through_device(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite `tensor` on every process with rank `src`'s."""
        if self.world_size > 1:
            import torch.distributed as dist

            self._through_device(tensor, lambda t: dist.broadcast(t, src=src))

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_to_main(self, local: list[torch.Tensor], shapes: list[list[tuple[int, ...]]], dtype: torch.dtype,
                       store: torch.device) -> list[torch.Tensor] | None:
        """Rank 0 receives every process's tensors (process r sends `local`, whose shapes are `shapes[r]`, known to
        all) and returns them in rank order, on `store`; the others send theirs and return None."""
        if self.world_size == 1:
            return [t.to(store) for t in local]
        import torch.distributed as dist

        if not self.is_main:
            for tensor in local:
                dist.send(tensor.to(device=self.device, dtype=dtype).contiguous(), dst=0)
            return None
        gathered = [t.to(store) for t in local]
        for rank in range(1, self.world_size):
            for shape in shapes[rank]:
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(buffer, src=rank)
                gathered.append(buffer.to(store))
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE_PROCESS = Collective()


def contiguous_shares(weights: list[int], parts: int) -> list[range]:
    """Split items 0..len(weights)-1 into `parts` contiguous ranges of about equal total weight (some may be
    empty when there are fewer items than parts)."""
    total = sum(weights)
    bounds, running, item = [0], 0, 0
    for part in range(1, parts):
        target = total * part / parts
        while item < len(weights) and running + weights[item] / 2 <= target:
            running += weights[item]
            item += 1
        bounds.append(item)
    bounds.append(len(weights))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def check_nproc(nproc: int, device: torch.device) -> None:
    if nproc < 1:
        raise QtoolError(f"--nproc {nproc} is not valid", "give 1 or more processes")
    if device.type == "cuda" and nproc > 1:
        available = torch.cuda.device_count()
        if nproc > available:
            raise QtoolError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {available}", f"use --nproc {available} or fewer, or --device cpu")
        if device.index not in (None, 0):
            raise QtoolError(f"--nproc {nproc} with --device {device}: the processes use cuda:0..cuda:{nproc - 1}", "use --device cuda")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, nproc: int, port: int, device_type: str, threads: int, messages: Any, target: Callable, args: tuple) -> None:
    """One process of the group: torchrun's environment, the process group, then `target(collective, report,
    *args)`; rank 0 sends the result (or any process its error) to the launcher."""
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://", rank=rank, world_size=nproc,
                                timeout=COLLECTIVE_TIMEOUT, **({"device_id": device} if device_type == "cuda" else {}))
        collective = Collective(rank, nproc, device)

        def report(done: int, total: int, detail: str = "") -> None:
            if rank == 0:
                messages.put(("progress", rank, (done, total, detail)))

        result = target(collective, report, *args)
        messages.put(("result", rank, result if rank == 0 else None))
    except QtoolError as exc:
        messages.put(("qtool_error", rank, (exc.message, exc.hint)))
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher with its traceback
        messages.put(("crash", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# How long stopped processes get to finish what they queued (a run's step saves, queued on a thread of their own)
# after the interrupt, before they are terminated.
STOP_GRACE_S = 60.0


def _stop(processes: list) -> None:
    """Interrupt the live processes (a KeyboardInterrupt in each, so that their step writers finish the saves
    queued), then terminate those still running after STOP_GRACE_S."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            try:
                os.kill(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()


def launch(nproc: int, device_type: str, target: Callable, args: tuple, progress: Callable[[int, int, str], None] | None = None) -> Any:
    """Run `target(collective, report, *args)` in `nproc` new processes (spawned, each with its own process group
    member) and return rank 0's result. `target` and `args` must be picklable (a module-level function). Rank 0's
    progress reaches `progress` here; the first process to fail stops the others and its error is raised here
    (a QtoolError as itself)."""
    import queue

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    messages = context.Queue()
    port = _free_port()
    # Each process gets the launcher's thread count: CPU matmuls then split their work as a one-process run does,
    # which keeps every product, hence the checkpoint, identical to it.
    threads = torch.get_num_threads()
    processes = [context.Process(target=_worker, args=(rank, nproc, port, device_type, threads, messages, target, args), daemon=False)
                 for rank in range(nproc)]
    for process in processes:
        process.start()
    result, finished, failure = None, set(), None
    try:
        while len(finished) < nproc and failure is None:
            try:
                kind, rank, payload = messages.get(timeout=1.0)
            except queue.Empty:
                dead = [rank for rank, p in enumerate(processes) if p.exitcode not in (None, 0) and rank not in finished]
                if dead:
                    failure = ("crash", dead[0], f"process {dead[0]} exited with code {processes[dead[0]].exitcode}")
                continue
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "result":
                finished.add(rank)
                if rank == 0:
                    result = payload
            else:
                failure = (kind, rank, payload)
    except BaseException:
        failure = failure or ("interrupted", -1, None)  # e.g. the caller's progress raised: stop the processes
        raise
    finally:
        if failure is not None:
            _stop(processes)
        for process in processes:
            process.join()
    if failure is not None:
        kind, rank, payload = failure
        if kind == "qtool_error":
            message, hint = payload
            raise QtoolError(message if nproc == 1 else f"{message} (process {rank} of {nproc})", hint)
        raise RuntimeError(f"process {rank} of {nproc} failed: {payload}")
    return result
