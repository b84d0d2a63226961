"""The decode step captured as CUDA graphs, one per batch size of a bucket list (1, 2, 4, ... up to the largest),
all reading one set of static input buffers and sharing one memory pool. A batch of B rows replays the graph of the
smallest size >= B, its rows after B padded (slot -1: no cache write; context 0: zero attention). With a q4 cache the
rows also carry their staging slots (a fourth int64 field); the block quantization around a step is the host's
(q4_decode.py), outside the graphs."""

from __future__ import annotations

import logging
import time

import torch

from qtool.runtime.engine.decode_step import DecodeInputs, DecodeRows, DecodeStep

logger = logging.getLogger(__name__)


def graph_batch_sizes(largest: int) -> tuple[int, ...]:
    """The captured batch sizes: powers of two below `largest`, then `largest` itself."""
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


class DecodeGraphs:
    """Graphs of `step` at `batch_sizes` (ascending). Build, then capture() once at engine start (before any
    request: the warm-up writes block 0 of the cache), then run(rows) per step. Inputs travel through pinned host
    buffers and two copies: [ids, positions, slots, staging slots] (int64) and [context lens, block tables]
    (int32)."""

    def __init__(self, step: DecodeStep, batch_sizes: tuple[int, ...], max_blocks: int, device: torch.device):
        self.step = step
        self.batch_sizes = tuple(batch_sizes)
        self.max_blocks = max_blocks
        largest = self.batch_sizes[-1]
        self.largest = largest
        # one row per field, so each field's slice of the first b rows is contiguous
        self.longs = torch.zeros(4, largest, dtype=torch.long, device=device)
        self.ints = torch.zeros(largest + largest * max_blocks, dtype=torch.int32, device=device)
        self.longs_host = torch.zeros(self.longs.shape, dtype=torch.long, pin_memory=True)
        self.ints_host = torch.zeros(self.ints.shape, dtype=torch.int32, pin_memory=True)
        self._longs_np = self.longs_host.numpy()
        self._ints_np = self.ints_host.numpy()
        self._tables_np = self._ints_np[largest:].reshape(largest, max_blocks)
        self._copied = torch.cuda.Event()  # the host buffers are rewritten only once the last copy has read them
        self._copied.record()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def inputs(self, size: int) -> DecodeInputs:
        """The static buffers' first `size` rows, as the step reads them."""
        ints = self.ints
        tables = ints[self.largest : self.largest + size * self.max_blocks].view(size, self.max_blocks)
        return DecodeInputs(self.longs[0, :size], self.longs[1, :size], tables, ints[:size], self.longs[2, :size],
                            self.longs[3, :size] if self.step.is_q4 else None)

    def bucket(self, batch: int) -> int | None:
        """The captured size that serves `batch` rows, or None (more rows than the largest graph)."""
        return next((size for size in self.batch_sizes if size >= batch and size in self.graphs), None)

    def _stage(self, rows: DecodeRows, size: int) -> None:
        """Copy rows into the static buffers' first `size` rows; rows after len(rows) are padding."""
        count = len(rows)
        self._copied.synchronize()
        longs, tables = self._longs_np, self._tables_np
        longs[0, :count], longs[1, :count], longs[2, :count] = rows.input_ids, rows.positions, rows.slots
        longs[0, count:size], longs[1, count:size], longs[2, count:size] = 0, 0, -1
        longs[3, :count] = rows.own_slots if rows.own_slots else -1
        longs[3, count:size] = -1
        self._ints_np[:count] = [p + 1 for p in rows.positions]
        self._ints_np[count:size] = 0
        for row, table in enumerate(rows.block_tables):
            tables[row, : len(table)] = table  # columns past the table keep old block ids: never read
        used = self.largest + size * self.max_blocks
        self.longs.copy_(self.longs_host, non_blocking=True)
        self.ints[:used].copy_(self.ints_host[:used], non_blocking=True)
        self._copied.record()

    def _warm_up_rows(self, size: int) -> DecodeRows:
        # every row a real one-token context in block 0 (q4: staging slot 0), so each kernel runs its full path
        return DecodeRows([0] * size, [0] * size, [0] * size, [[0]] * size, [0] * size if self.step.is_q4 else None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up every size eagerly (Triton kernels compile; quantized linears tune their plan for that M and
        grow their split-K workspace, which a graph captured earlier would otherwise still point at), then
        capture every size, largest first. A capture that fails leaves no graph and logs why (steps run eagerly)."""
        began = time.perf_counter()
        logger.info("engine: capturing the decode step as CUDA graphs at batch sizes %s (kernel compilation and "
                    "tuning happen now, not in a request)", ", ".join(map(str, self.batch_sizes)))
        for size in self.batch_sizes:
            self._stage(self._warm_up_rows(size), size)
            for _ in range(2):
                self.step(self.inputs(size))
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        try:
            for size in reversed(self.batch_sizes):
                self._stage(self._warm_up_rows(size), size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.step(self.inputs(size))
                self.graphs[size] = (graph, logits)
        except RuntimeError as exc:
            self.graphs.clear()
            torch.cuda.synchronize()
            logger.warning("engine: CUDA graph capture failed, decode steps run without graphs (%s)",
                           str(exc).splitlines()[0][:300])
            return
        torch.cuda.synchronize()
        logger.info("engine: captured %d decode graphs in %.1f s", len(self.graphs), time.perf_counter() - began)

    def run(self, rows: DecodeRows) -> torch.Tensor:
        """Logits [len(rows), vocab] (float32, a copy: the graph's output is overwritten by the next replay)."""
        return self.replay(self.stage(rows), len(rows))

    def stage(self, rows: DecodeRows) -> int:
        """Copy rows into the static buffers; the captured size to replay."""
        size = self.bucket(len(rows))
        if size is None:
            raise ValueError(f"{len(rows)} rows exceed the largest captured batch ({self.largest})")
        self._stage(rows, size)
        return size

    def replay(self, size: int, count: int, copy: bool = True) -> torch.Tensor:
        """Replay the graph of `size` on the staged rows; logits of the first `count` rows: a copy, or with
        copy=False the graph's own output, valid until the next replay (a caller that is done with them by then
        saves a kernel per step)."""
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:count].clone() if copy else logits[:count]
