"""Where one training step's device time goes: torch.profiler's events of one step turned into kernel time by
category (dequant, base GEMM, LoRA GEMM, attention, elementwise, casts/copies, loss, optimizer, other), the top
kernels by time, and the gaps in the device's timeline where it waited on the host. Used by qlora_step.py
--profile.

On a GPU a "kernel" is a device event (kernel, memcpy, memset), its category read from the op that launched it
(found through the runtime call with the kernel's correlation id) and that op's parents; on the CPU it is an op's
self time, with the op and its parents. Busy time is the union of the kernels' intervals (on the CPU: of every op's),
and idle time is the step's wall time minus busy time: on a GPU, the time the device waited for Python to launch.

The categories are decided by names, first match wins (see classify):
  dequant      under a qtool::dequantize range, or a kernel named *dequant* (bitsandbytes' kDequantize*)
  optimizer    under Optimizer.step / Optimizer.zero_grad (torch's own ranges), or multi_tensor_apply kernels
  loss         under cross_entropy / log_softmax / nll_loss and their backwards
  attention    under scaled_dot_product_* / flash / efficient attention, or a kernel named so
  lora_gemm    a matmul op with an input dimension equal to the LoRA rank (x @ A^T, dY @ B, the adapters' grads)
  base_gemm    every other matmul op (the frozen linears, the head), or a kernel named gemm/nvjet/cutlass
  cast_copy    copy_/to/contiguous/clone/fill/zero ops, memcpy and memset
  elementwise  the rest of aten's pointwise and reduction ops (norm, RoPE, SiLU, residual adds, embedding)
  other        none of these
"""

# no `from __future__ import annotations`: tests load this file by path, unregistered, where dataclasses would
# have to resolve string annotations through sys.modules
import re
from dataclasses import dataclass, field

from qtool.kernels.profiled_range import DEQUANTIZE_RANGE  # qtool's dequantizations run inside it while profiled

CATEGORIES = ("dequant", "base_gemm", "lora_gemm", "attention", "elementwise", "cast_copy", "loss", "optimizer",
              "other")
STEP_RANGE = "qlora_step"
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_addmm_activation"}
COPY_OPS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::fill_",
            "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::_copy_from", "aten::_copy_from_and_resize"}
LOSS_MARKS = ("cross_entropy", "log_softmax", "nll_loss")
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "_flash_attn", "fmha", "cudnn_attention")
# torch's kernels, then qtool's fused training kernels (kernels/train_ops_triton.py, engine_ops_triton.py)
ELEMENTWISE_NAMES = ("elementwise", "reduce_kernel", "vectorized", "unrolled", "index", "embedding", "cat",
                     "rms_norm", "rope", "silu_mul")
ALLOCATING_OPS = ("aten::empty", "aten::empty_strided")  # every tensor's storage comes from one of these
RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")  # cudaLaunchKernel, cuLaunchKernelEx (Triton), cudaMemcpyAsync, ...
TOP_KERNELS = 20
TOP_GAPS = 10


@dataclass
class KernelRecord:
    """One kernel (or CPU op's self time): name, start and duration in microseconds, the ops it ran under
    (innermost first), the input shapes of the innermost op that recorded any, and which launch it was (kernels of
    one op share it: a GEMM's FLOPs are counted once, however many kernels it took)."""

    name: str
    start_us: float
    duration_us: float
    ops: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    launch: int = 0


@dataclass
class StepEvents:
    """What the profiler saw in one step: its kernels, the step's wall window, the intervals during which the
    device (on the CPU: some op) was busy, how many aten ops the host ran and how many weights it dequantized
    (DEQUANTIZE_RANGE ranges), and how many aten ops allocated a tensor (empty, empty_strided)."""

    kernels: list[KernelRecord]
    wall: tuple[float, float]
    busy: list[tuple[float, float]] = field(default_factory=list)
    host_ops: int = 0
    dequantizations: int = 0
    allocating_ops: int = 0


def _has(names: tuple[str, ...], marks) -> bool:
    return any(mark in name for name in names for mark in marks)


def classify(record: KernelRecord, rank: int) -> str:
    """The category of one kernel (see the module's docstring for the rules, in order)."""
    name = record.name.lower()
    ops = tuple(op.lower() for op in record.ops)
    innermost_aten = next((op for op in record.ops if op.startswith("aten::")), "")
    # by name: a dequantize kernel (ours, bitsandbytes' kDequantize*), not the host time of DequantLowRankFunction
    if DEQUANTIZE_RANGE in record.ops or ("dequant" in name and "lowrank" not in name):
        return "dequant"
    if _has(ops, ("optimizer.step", "optimizer.zero_grad")) or "multi_tensor_apply" in name:
        return "optimizer"
    if _has(ops, LOSS_MARKS):
        return "loss"
    if _has(ops, ATTENTION_MARKS) or any(mark in name for mark in ("flash", "fmha", "attention")):
        return "attention"
    if innermost_aten in GEMM_OPS or (not innermost_aten and any(m in name for m in ("gemm", "nvjet", "cutlass"))):
        return "lora_gemm" if any(rank in shape for shape in record.shapes) else "base_gemm"
    if innermost_aten in COPY_OPS or "memcpy" in name or "memset" in name or (not innermost_aten and "copy" in name):
        return "cast_copy"
    if innermost_aten or any(mark in name for mark in ELEMENTWISE_NAMES):
        return "elementwise"
    return "other"


def matmul_flops(shapes: tuple[tuple[int, ...], ...]) -> int:
    """2 * M * K * N of a 2-D matmul op's inputs (mm: [M, K], [K, N]; addmm: the bias first), else 0."""
    matrices = [s for s in shapes if len(s) == 2]
    for first, second in zip(matrices, matrices[1:]):
        if first[1] == second[0]:
            return 2 * first[0] * first[1] * second[1]
    return 0


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def summarize(events: StepEvents, rank: int, top: int = TOP_KERNELS) -> dict:
    """{wall_us, kernel_us, busy_us, idle_us, busy_share, kernels, host_ops, dequantizations, allocating_ops,
    categories: {name: {us, share, count}} (every category, shares of kernel time; the GEMM categories also with the
    TFLOP/s their ops' shapes give), top_kernels: [{name, category, us, count}] (per name and category, by total
    time), gaps: the idle intervals inside the step, largest first, with the kernels either side}."""
    wall_start, wall_end = events.wall
    by_category = {name: {"us": 0.0, "count": 0} for name in CATEGORIES}
    by_kernel: dict[tuple[str, str], dict] = {}
    flops = {"base_gemm": 0, "lora_gemm": 0}
    counted: set[int] = set()
    for record in events.kernels:
        category = classify(record, rank)
        by_category[category]["us"] += record.duration_us
        by_category[category]["count"] += 1
        if category in flops and record.launch not in counted:
            counted.add(record.launch)
            flops[category] += matmul_flops(record.shapes)
        entry = by_kernel.setdefault((record.name, category),
                                     {"name": record.name, "category": category, "us": 0.0, "count": 0})
        entry["us"] += record.duration_us
        entry["count"] += 1
    kernel_us = sum(c["us"] for c in by_category.values())
    for name, values in by_category.items():
        values["share"] = round(values["us"] / kernel_us, 4) if kernel_us else 0.0
        if name in flops:  # what the GEMMs achieved: against the card's peak, how far the matmuls are from the floor
            values["tflops"] = float(f"{flops[name] / values['us'] / 1e6:.4g}") if values["us"] else 0.0
        values["us"] = round(values["us"], 1)
    busy = _union([(max(a, wall_start), min(b, wall_end)) for a, b in events.busy if b > wall_start and a < wall_end])
    busy_us = sum(b - a for a, b in busy)
    gaps = _gaps(busy, events, wall_start, wall_end)
    top_kernels = sorted(by_kernel.values(), key=lambda k: k["us"], reverse=True)[:top]
    for entry in top_kernels:
        entry["us"] = round(entry["us"], 1)
    wall_us = wall_end - wall_start
    return {
        "wall_us": round(wall_us, 1), "kernel_us": round(kernel_us, 1), "busy_us": round(busy_us, 1),
        "idle_us": round(wall_us - busy_us, 1), "busy_share": round(busy_us / wall_us, 4) if wall_us else 0.0,
        "kernels": len(events.kernels), "host_ops": events.host_ops, "dequantizations": events.dequantizations,
        "allocating_ops": events.allocating_ops,
        "categories": by_category,
        "top_kernels": top_kernels, "gaps": gaps,
    }


def _gaps(busy: list[tuple[float, float]], events: StepEvents, wall_start: float, wall_end: float) -> dict:
    """The idle intervals of the step (before the first busy interval, between them, after the last): their
    count, how many exceed 10 us, the TOP_GAPS largest with the kernel that ended before and the one that began
    after (and the ops that launched it), and the idle time summed by the op that launched the kernel ending each
    gap (what the device waited for; on the CPU the next op itself), largest first."""
    import bisect

    edges = [wall_start, *[t for interval in busy for t in interval], wall_end]
    idle = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]
    by_start = sorted(events.kernels, key=lambda k: k.start_us)
    starts = [k.start_us for k in by_start]

    def next_kernel(end: float) -> KernelRecord | None:
        i = bisect.bisect_left(starts, end)
        return by_start[i] if i < len(by_start) else None

    def previous_kernel(start: float) -> KernelRecord | None:
        i = bisect.bisect_right(starts, start)
        return next((k for k in reversed(by_start[:i]) if k.start_us + k.duration_us <= start + 1e-6), None)

    waited_for: dict[str, float] = {}
    for a, b in idle:
        following = next_kernel(b)
        key = (following.ops[0] if following.ops else following.name) if following else "(end of step)"
        waited_for[key] = waited_for.get(key, 0.0) + b - a
    largest = []
    for a, b in sorted(idle, key=lambda g: g[1] - g[0], reverse=True)[:TOP_GAPS]:
        before, after = previous_kernel(a), next_kernel(b)
        largest.append({"us": round(b - a, 1), "at_us": round(a - wall_start, 1), "after": before.name if before else "",
                        "before": after.name if after else "", "launched_by": list(after.ops[:4]) if after else []})
    return {
        "count": len(idle), "over_10us": sum(1 for a, b in idle if b - a > 10), "largest": largest,
        "waited_for": [{"op": op, "us": round(us, 1)}
                       for op, us in sorted(waited_for.items(), key=lambda item: item[1], reverse=True)[:TOP_GAPS]],
    }


def _chain(event) -> tuple[str, ...]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return tuple(names)


def _shapes(event) -> tuple[tuple[int, ...], ...]:
    while event is not None:
        shapes = tuple(tuple(s) for s in (event.input_shapes or ()) if isinstance(s, (list, tuple)) and s)
        if shapes:
            return shapes
        event = event.cpu_parent
    return ()


def step_events(prof, device_type: str) -> StepEvents:
    """StepEvents of a profiler run that recorded one step inside record_function(STEP_RANGE) (record_shapes on)."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    step = next((e for e in cpu if e.name == STEP_RANGE), None)
    if step is None:
        raise ValueError(f"no {STEP_RANGE} range in the profile: record the step inside record_function({STEP_RANGE!r})")
    wall = (step.time_range.start, step.time_range.end)
    host_ops = sum(1 for e in cpu if e.name.startswith("aten::"))
    dequantizations = sum(1 for e in cpu if e.name == DEQUANTIZE_RANGE)
    allocating = sum(1 for e in cpu if e.name in ALLOCATING_OPS)
    counts = dict(host_ops=host_ops, dequantizations=dequantizations, allocating_ops=allocating)
    if device_type != "cuda":
        kernels = [KernelRecord(e.name, e.time_range.start, e.self_cpu_time_total, _chain(e), _shapes(e), id(e))
                   for e in cpu if e.self_cpu_time_total > 0 and e is not step]
        busy = [(e.time_range.start, e.time_range.end) for e in cpu if e is not step and e.cpu_parent in (None, step)]
        return StepEvents(kernels, wall, busy, **counts)
    runtime = {e.id: e for e in cpu if RUNTIME_CALL.match(e.name)}
    ops_by_id = {e.id: e for e in cpu if not RUNTIME_CALL.match(e.name)}
    kernels = []
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        launch = runtime.get(e.id)
        op = launch.cpu_parent if launch is not None else ops_by_id.get(getattr(e, "linked_correlation_id", 0) or -1)
        kernels.append(KernelRecord(e.name, e.time_range.start, e.time_range.elapsed_us(), _chain(op), _shapes(op),
                                    id(op) if op is not None else id(e)))
    busy = [(k.start_us, k.start_us + k.duration_us) for k in kernels]
    return StepEvents(kernels, wall, busy, **counts)


def format_table(system: str, summary: dict) -> str:
    """The summary as a printed table: categories, the largest kernels, the idle time and largest gaps."""
    wall = summary["wall_us"]
    lines = [f"== {system}: step {wall / 1e3:.2f} ms, kernels {summary['kernel_us'] / 1e3:.2f} ms "
             f"({summary['kernels']} launched), busy {summary['busy_share']:.1%}, idle {summary['idle_us'] / 1e3:.2f} ms, "
             f"{summary['host_ops']} aten ops on the host ({summary['allocating_ops']} allocating), "
             f"{summary['dequantizations']} weights dequantized",
             f"{'category':<12} {'ms':>9} {'share':>7} {'count':>7} {'TFLOP/s':>8}"]
    for name, values in summary["categories"].items():
        tflops = f"{values['tflops']:>8.1f}" if "tflops" in values else ""
        lines.append(f"{name:<12} {values['us'] / 1e3:>9.3f} {values['share']:>7.1%} {values['count']:>7} {tflops}")
    lines.append(f"{'top kernels':<60} {'category':<12} {'ms':>9} {'count':>6}")
    for k in summary["top_kernels"]:
        lines.append(f"{k['name'][:60]:<60} {k['category']:<12} {k['us'] / 1e3:>9.3f} {k['count']:>6}")
    gaps = summary["gaps"]
    lines.append("idle time by the op launching the kernel after it: " +
                 ", ".join(f"{w['op']} {w['us'] / 1e3:.2f} ms" for w in gaps["waited_for"]))
    lines.append(f"idle gaps: {gaps['count']}, {gaps['over_10us']} over 10 us; largest:")
    for g in gaps["largest"]:
        lines.append(f"  {g['us'] / 1e3:8.3f} ms at {g['at_us'] / 1e3:8.2f} ms  after {g['after'][:40]!r} before {g['before'][:40]!r}")
    return "\n".join(lines)
