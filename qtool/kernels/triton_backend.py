"""The Triton matmul backend for GPTQ linears: repacks a layer once, then serves y = x @ W^T by M bucket with
the GEMV kernel (M = 1), split-K tl.dot (skinny M), tl.dot tiles or dequantize + cuBLAS (large M). The config for
each (M bucket, shape, bits, group) is decided once per backend: a plan tuned before and kept on disk
(kernels/plan_store.py; `qtool tune` writes them), else, for a tuning backend, the fastest candidate by timing,
else a default plan by rule per GPU family (kernels/default_plans.py), which is what users get without tuning."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import triton

from qtool.core.errors import QtoolError
from qtool.formats.gptq import GPTQ_BITS
from qtool.kernels.gptq_gemm_triton import (
    MODE_DEQUANT,
    MODE_MAGIC,
    UNPACK_POINTER,
    UNPACK_RESHAPE,
    GemmConfig,
    gemm_config_valid,
    gptq_dequantize,
    gptq_gemm,
    gptq_matmul_dequant,
    triton_interpreted,
)
from qtool.kernels.gptq_gemm_left_triton import (
    LEFT_DENORMAL,
    LEFT_PACKED,
    LEFT_DEQUANT,
    LEFT_PAIRS,
    LeftGemmConfig,
    gptq_gemm_left,
    left_config_valid,
    left_workspace,
)
from qtool.kernels.gptq_gemv_cuda import BLOCK_ROWS as CUDA_BLOCK_ROWS, TILE_N as CUDA_TILE_N, CudaGemv, CudaGemvConfig, cuda_gemv_problem, gptq_gemv_cuda, load_cuda_gemv
from qtool.kernels.gptq_gemv_triton import MAX_GEMV_ROWS, MAX_TWO_D_ROWS, GemvConfig, gemv_tile_fits, gptq_gemv, unit_rows
from qtool.kernels.repack import GptqComputeWeight, repack_gptq
from qtool.kernels.default_plans import PACKED, Pick, gpu_family, rule_for, rules_for
from qtool.kernels.plan_store import PlanStore, default_cache_dir, kernel_fingerprint
from qtool.kernels.registry import triton_device_problem
from qtool.kernels.timing import copies_to_defeat_l2, time_calls_in_graph

logger = logging.getLogger(__name__)

SKINNY_MAX_M = 16  # M up to this is "skinny": BM = 16 tiles; prepare() reserves split-K workspace for it
MAX_M_BUCKET = 4096
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def m_bucket(m: int) -> int:
    """The M bucket a call is tuned under: the next power of two, capped."""
    return min(1 << max(m - 1, 0).bit_length(), MAX_M_BUCKET)


@dataclass(frozen=True)
class Plan:
    """How one call is served: kind "gemv" | "gemm" | "left" (Triton kernels) | "cuda_gemv" (the CUDA GEMV, 4-bit,
    M <= 4, where its extension built) | "dequant" (dequantize + torch.matmul)."""

    kind: str
    config: GemvConfig | GemmConfig | LeftGemmConfig | CudaGemvConfig | None = None

    def describe(self) -> str:
        if self.config is None:
            return self.kind
        fields = ", ".join(f"{k}={v}" for k, v in vars(self.config).items())
        return f"{self.kind}({fields})"


# the config class of each plan kind, for plans read back from the disk cache
PLAN_TYPES = {"gemv": GemvConfig, "gemm": GemmConfig, "left": LeftGemmConfig, "cuda_gemv": CudaGemvConfig,
              "dequant": None}


@dataclass(frozen=True)
class TuneKey:
    m_bucket: int
    out_features: int
    k_rows: int
    bits: int
    group_rows: int
    has_perm: bool
    has_zeros: bool
    dtype: str
    device: str


def tune_key(weight: GptqComputeWeight, m: int, dtype: torch.dtype, device: torch.device) -> TuneKey:
    return TuneKey(m_bucket(m), weight.out_features, weight.k_rows, weight.bits, weight.group_rows,
                   weight.perm is not None, weight.zeros is not None, str(dtype), str(device))


def _split_for(tiles_mn: int, k_tiles: int, target_programs: int, within: bool = False) -> int:
    """Splits along K that bring the grid near target_programs without leaving a split empty; within: the most
    splits whose grid stays at or below target_programs."""
    wanted = target_programs // max(tiles_mn, 1) if within else round(target_programs / max(tiles_mn, 1))
    split = max(1, min(k_tiles, wanted))
    per_split = math.ceil(k_tiles / split)
    return math.ceil(k_tiles / per_split)


def _tile_k_and_split(weight: GptqComputeWeight, m: int, bm: int, bn: int, bk: int, per_sm: int,
                      num_sms: int, within: bool = False) -> tuple[int, int]:
    """(K tile, splits) of a tl.dot shape: the K tile halved until it fits inside a group; K split so the grid
    holds about per_sm programs per SM (per_sm 0: no split; within: at most per_sm)."""
    while bk > 32 and weight.group_rows % bk:
        bk //= 2
    if not per_sm:
        return bk, 1
    tiles_mn = triton.cdiv(m, bm) * triton.cdiv(weight.out_features, bn)
    return bk, _split_for(tiles_mn, triton.cdiv(weight.k_rows, bk), per_sm * num_sms, within)


# (block_n, K rows per tile, warps, sum rows every tile, programs per SM, prefetch). block_n = 128*warps puts the
# warps side by side along N so each thread holds whole columns of the tile: the per-column scale needs no layout
# conversion and rows are summed in-thread every tile. block_n <= 128 stacks the warps along K instead. Prefetch
# (tile t+1 loaded while tile t is computed) pays with longer loops, hence fewer programs per SM.
GEMV_SHAPES = (
    (128, 128, 4, False, 4, False), (1024, 32, 4, True, 4, False), (512, 32, 2, True, 4, False),
    (256, 128, 4, False, 4, False), (128, 64, 4, False, 8, False), (64, 128, 2, False, 8, False),
    (128, 128, 4, False, 2, True), (128, 64, 4, False, 4, True), (1024, 32, 4, True, 2, True),
    (1024, 16, 4, True, 4, True), (256, 64, 4, False, 2, True), (512, 32, 4, True, 2, True),
)
# the 3-D multi-row GEMV (3 <= M <= MAX_GEMV_ROWS): each thread's FMA work grows with M, so narrower tiles
GEMV_ROWS_SHAPES = (
    (256, 32, 4, True, 4, False), (512, 32, 4, True, 2, False), (256, 64, 4, False, 4, False),
    (128, 64, 4, False, 8, False),
)


# (warps along K, thread blocks per SM) of the CUDA GEMV's candidates
CUDA_GEMV_SHAPES = ((4, 4), (8, 2), (4, 8), (8, 4), (2, 8))


def _cuda_gemv_candidates(weight: GptqComputeWeight, m: int, dtype: torch.dtype, num_sms: int,
                          shapes: tuple | None = None) -> list[Plan]:
    """The CUDA GEMV's plans (of the table, or of `shapes`) for a layer it can serve; the caller checks that the
    extension is built."""
    if cuda_gemv_problem(weight, m, dtype) is not None:
        return []
    tiles_n = triton.cdiv(weight.out_features, CUDA_TILE_N)
    k_blocks = triton.cdiv(weight.k_rows, CUDA_BLOCK_ROWS)
    plans = []
    for warps_k, per_sm in shapes or CUDA_GEMV_SHAPES:
        plan = Plan("cuda_gemv", CudaGemvConfig(split_k=_split_for(tiles_n, k_blocks, per_sm * num_sms), warps_k=warps_k))
        if plan not in plans:
            plans.append(plan)
    return plans


def _gemv_candidates(weight: GptqComputeWeight, m: int, num_sms: int, shapes: tuple | None = None) -> list[Plan]:
    """The GEMV plans of the table for M rows (or of `shapes`, entries in the tables' layout)."""
    rows_per_unit = unit_rows(weight.bits)
    num_units = weight.k_rows // rows_per_unit
    plans = []
    if shapes is None:
        shapes = GEMV_SHAPES if m <= MAX_TWO_D_ROWS else GEMV_ROWS_SHAPES
    # the denormal unpacking (2/4/8 bits) throughout: faster than the mantissa one at 4 and 8 bits on every
    # layer of bench/kernels.py (bench/RESULTS.md)
    for block_n, tile_rows, warps, row_sum, per_sm, prefetch in shapes:
        units = max(1, tile_rows // rows_per_unit)
        while units > 1 and not gemv_tile_fits(weight, units):
            units //= 2
        if not gemv_tile_fits(weight, units):
            continue
        tiles_n = triton.cdiv(weight.out_features, block_n)
        split = _split_for(tiles_n, triton.cdiv(num_units, units), per_sm * num_sms)
        plan = Plan("gemv", GemvConfig(block_n=block_n, units=units, split_k=split, num_warps=warps,
                                       row_sum_each_tile=row_sum, prefetch=prefetch))
        if plan not in plans:
            plans.append(plan)
    return plans


def _gemm_candidates(weight: GptqComputeWeight, m: int, dtype: torch.dtype, num_sms: int) -> list[Plan]:
    magic_ok = not (dtype == torch.bfloat16 and weight.bits > 7)
    mode_small = MODE_MAGIC if magic_ok else MODE_DEQUANT
    if m <= SKINNY_MAX_M:
        shapes = [  # (BM, BN, BK, unpack, mode, warps, stages, programs per SM)
            (16, 64, 128, UNPACK_RESHAPE, mode_small, 4, 2, 4), (16, 64, 128, UNPACK_POINTER, mode_small, 4, 2, 4),
            (16, 128, 128, UNPACK_RESHAPE, mode_small, 4, 2, 2), (16, 64, 256, UNPACK_RESHAPE, mode_small, 4, 2, 4),
            (16, 128, 64, UNPACK_POINTER, mode_small, 4, 3, 4), (16, 32, 128, UNPACK_RESHAPE, mode_small, 2, 2, 8),
            (16, 64, 64, UNPACK_RESHAPE, mode_small, 4, 3, 8),
        ]
    elif m <= 128:
        shapes = [
            (32, 64, 64, UNPACK_POINTER, mode_small, 4, 3, 2), (32, 128, 64, UNPACK_RESHAPE, mode_small, 4, 3, 2),
            (64, 64, 64, UNPACK_POINTER, MODE_DEQUANT, 4, 3, 2), (64, 128, 64, UNPACK_POINTER, MODE_DEQUANT, 4, 3, 0),
            (64, 128, 128, UNPACK_RESHAPE, mode_small, 8, 3, 0), (128, 128, 64, UNPACK_POINTER, MODE_DEQUANT, 8, 3, 0),
        ]
    else:
        # the weight tile is dequantized once per program and used for BM rows: BM = 256 halves that cost per
        # flop, which is what keeps the tensor cores fed at large M
        shapes = [
            (128, 128, 64, UNPACK_POINTER, MODE_DEQUANT, 8, 3, 0), (256, 128, 64, UNPACK_POINTER, MODE_DEQUANT, 8, 3, 0),
            (256, 128, 64, UNPACK_RESHAPE, MODE_DEQUANT, 8, 3, 0), (128, 256, 64, UNPACK_POINTER, MODE_DEQUANT, 8, 3, 0),
            (128, 128, 64, UNPACK_RESHAPE, MODE_DEQUANT, 8, 4, 0), (256, 64, 64, UNPACK_RESHAPE, MODE_DEQUANT, 8, 4, 0),
        ]
    plans = []
    for bm, bn, bk, unpack, mode, warps, stages, per_sm in shapes:
        bk, split = _tile_k_and_split(weight, m, bm, bn, bk, per_sm, num_sms)
        config = GemmConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, mode=mode, unpack=unpack,
                            num_warps=warps, num_stages=stages)
        if gemm_config_valid(weight, config, dtype) and Plan("gemm", config) not in plans:
            plans.append(Plan("gemm", config))
    return plans


# Weight-left tl.dot (2/4/8 bits): (BM, BN, BK, mode, warps, stages, programs per SM; 0 = no split-K). The token
# side BM is the wgmma N (16 at least in Triton); the weight side BN is a multiple of 64 rows per warpgroup. Mode
# NATURAL is the dtype's natural-order unpacking: DENORMAL for bfloat16 (its best candidate beat DEQUANT's at every
# layer and M from 16 to 1024 but one; the DEQUANT shape kept below won that one), DEQUANT for float16, which
# cannot hold DENORMAL's scaled tile. Layers in fragment order also try every NATURAL shape of up to PACKED_MAX_BM
# tokens as PACKED (a third of DENORMAL's instructions per value saved; faster at M = 16, not with 128-token
# tiles, whose per-tile epilogue is as large as the unpacking: bench/RESULTS.md).
NATURAL = -1
PACKED_MAX_BM = 64
LEFT_SKINNY_SHAPES = (
    (16, 64, 128, NATURAL, 4, 4, 4), (16, 64, 128, NATURAL, 4, 5, 4), (16, 64, 128, NATURAL, 4, 4, 8),
    (16, 64, 64, NATURAL, 4, 5, 8), (16, 128, 128, NATURAL, 8, 3, 4), (16, 128, 128, NATURAL, 8, 4, 4),
    (16, 128, 128, NATURAL, 4, 3, 2), (16, 64, 128, LEFT_PAIRS, 4, 4, 4), (16, 128, 64, LEFT_PAIRS, 4, 4, 4),
)
LEFT_MID_SHAPES = (
    (64, 128, 128, NATURAL, 8, 3, 2), (64, 128, 128, NATURAL, 8, 4, 2), (64, 64, 128, NATURAL, 4, 4, 4),
    (32, 64, 128, NATURAL, 4, 4, 4), (64, 128, 64, NATURAL, 4, 3, 2), (32, 128, 128, NATURAL, 8, 3, 2),
    (64, 64, 64, NATURAL, 4, 3, 2), (64, 64, 64, NATURAL, 4, 3, 4), (64, 128, 128, LEFT_DEQUANT, 8, 3, 2),
    (64, 128, 128, LEFT_PAIRS, 8, 3, 2),
)
# large M: split K only as far as it takes to give every SM a program (few output tiles on narrow layers)
LEFT_LARGE_SHAPES = (
    (128, 128, 64, NATURAL, 8, 3, 1), (128, 128, 128, NATURAL, 8, 3, 1), (256, 128, 64, NATURAL, 8, 3, 1),
    (256, 128, 64, NATURAL, 8, 4, 1), (128, 128, 64, NATURAL, 8, 4, 1),
)


def _few_waves(m: int, weight: GptqComputeWeight, bm: int, bn: int, resident: int) -> bool:
    """Whether a grid of whole output tiles is under four waves and not a whole number of them: the last wave
    leaves SMs idle for a large share of the run."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(weight.out_features, bn)
    return tiles < 4 * resident and tiles % resident != 0


def _left_shapes(m: int) -> tuple:
    if m <= SKINNY_MAX_M:
        return LEFT_SKINNY_SHAPES
    if m <= 64:
        return LEFT_MID_SHAPES
    if m <= 128:
        # 64-row tiles dequantize every weight tile twice at M = 128 and fell behind bf16 there: the large tiles too
        return LEFT_MID_SHAPES + tuple(shape for shape in LEFT_LARGE_SHAPES if shape[0] <= 128)
    return LEFT_LARGE_SHAPES


def _left_candidates(weight: GptqComputeWeight, m: int, dtype: torch.dtype, num_sms: int,
                     shapes: tuple | None = None) -> list[Plan]:
    """The weight-left plans of the tables for M rows (or of `shapes`, entries in the tables' layout)."""
    if shapes is None:
        shapes = _left_shapes(m)
    natural = LEFT_DENORMAL if dtype == torch.bfloat16 else LEFT_DEQUANT
    plans = []
    for bm, bn, bk, mode, warps, stages, per_sm in shapes:
        if mode == LEFT_PAIRS and weight.fragment_order:
            continue  # PAIRS gathering x in fragment order was always slower than in plain order: never picked
        modes = [natural if mode == NATURAL else mode]
        if mode == NATURAL and bm <= PACKED_MAX_BM:
            modes.append(LEFT_PACKED)  # left_config_valid drops it for layers not in fragment order
        # the grid rounded to the nearest and rounded down to per_sm programs per SM: a grid just past what the
        # SMs hold at once runs a short tail wave
        launches = [_tile_k_and_split(weight, m, bm, bn, bk, per_sm, num_sms, within) + (0,) for within in (False, True)]
        if per_sm == 1 and m > 64 and _few_waves(m, weight, bm, bn, num_sms):
            # stream-K: every SM's program gets the same share of all tiles' K tiles, where whole tiles would leave
            # SMs idle (70B qkv at M = 256: 80 tiles of 256x128 for 132 SMs). Only the one-program-per-SM tile
            # shapes: the 64-token shapes (two or four programs per SM) lost to the best plan as stream-K
            launches.append((launches[0][0], 1, num_sms))
        for tile_k, split, programs in launches:
            for tile_mode in modes:
                # PACKED's ways of feeding its loop, which change no value (left_config_valid drops them for the
                # other modes): each won on some tile shape and none on all; staged words alone never won
                for staged, ahead in ((False, False), (False, True), (True, True)):
                    config = LeftGemmConfig(block_m=bm, block_n=bn, block_k=tile_k, split_k=split, mode=tile_mode,
                                            num_warps=warps, num_stages=stages, staged_words=staged,
                                            scale_ahead=ahead, stream_programs=programs)
                    if left_config_valid(weight, config, dtype) and Plan("left", config) not in plans:
                        plans.append(Plan("left", config))
    return plans


def candidate_plans(weight: GptqComputeWeight, m: int, dtype: torch.dtype, num_sms: int,
                    cuda_gemv: bool = False) -> list[Plan]:
    """Plans worth timing for a call with M rows; the first is the untimed default. cuda_gemv: the CUDA GEMV's
    extension is built, so its plans are candidates too."""
    gemv = _gemv_candidates(weight, m, num_sms) if m <= MAX_GEMV_ROWS else []
    if cuda_gemv:
        gemv += _cuda_gemv_candidates(weight, m, dtype, num_sms)
    left = _left_candidates(weight, m, dtype, num_sms)
    # the default (first) plan: the GEMV for one row, the tensor-core kernel from two rows on
    plans = gemv + left if m == 1 else left + gemv
    # in fragment order the x-left tl.dot kernel gathers x in pairs of rows: its best plan was always far behind the
    # best plan, and even in plain order it was never the fastest for a 4-bit layer
    if not weight.fragment_order:
        plans += _gemm_candidates(weight, max(m, 2), dtype, num_sms)
    if m >= 32:
        plans.append(Plan("dequant"))
    return plans


@dataclass(frozen=True)
class GpuFacts:
    """What plans depend on besides the layer: the GPU's name (tuned plans are kept per name), compute capability
    (default plans are chosen per family) and SM count (grids are sized by it)."""

    name: str
    capability: tuple[int, int]
    num_sms: int

    @classmethod
    def of(cls, device: torch.device) -> "GpuFacts":
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return cls(props.name, (props.major, props.minor), props.multi_processor_count)
        return cls(device.type, (0, 0), 4)


def _built_pick(pick: Pick, weight: GptqComputeWeight, m: int, dtype: torch.dtype, num_sms: int) -> list[Plan]:
    """The plans the tuner's builders make from one pick (several launches of one shape: the first is taken)."""
    if pick.kind == "dequant":
        return [Plan("dequant")]
    if pick.kind == "cuda_gemv":
        return _cuda_gemv_candidates(weight, m, dtype, num_sms, (pick.shape,))
    if pick.kind == "gemv":
        return _gemv_candidates(weight, m, num_sms, (pick.shape,))
    mode = LEFT_PACKED if pick.mode == PACKED else (LEFT_DENORMAL if dtype == torch.bfloat16 else LEFT_DEQUANT)
    return [plan for plan in _left_candidates(weight, m, dtype, num_sms, (pick.shape,))
            if plan.config.mode == mode and plan.config.staged_words == pick.staged_words
            and plan.config.scale_ahead == pick.scale_ahead and (plan.config.stream_programs > 0) == pick.stream_k]


def default_plan(weight: GptqComputeWeight, m: int, dtype: torch.dtype, gpu: GpuFacts,
                 candidates: list[Plan] | None = None, cuda_gemv: bool = False) -> Plan:
    """The plan a layer gets without timing: the first pick of the GPU family's rule (default_plans.py) that is a
    candidate for it, else the candidates' first (the GEMV for one row, the tensor-core kernel from two), else
    dequantize + torch.matmul (which serves every layer). `candidates`: candidate_plans' list, if built already."""
    if candidates is None:
        candidates = candidate_plans(weight, m, dtype, gpu.num_sms, cuda_gemv)
    rule = rule_for(rules_for(gpu.capability), m_bucket(m), weight.out_features, weight.k_rows, weight.bits)
    for pick in rule.picks if rule is not None else ():
        for plan in _built_pick(pick, weight, m, dtype, gpu.num_sms)[:1]:
            if plan in candidates:
                return plan
    return candidates[0] if candidates else Plan("dequant")


def interpreter_plan(weight: GptqComputeWeight, m: int, dtype: torch.dtype) -> Plan:
    """One small fixed plan for TRITON_INTERPRET runs (split-K on, so the reduction path is exercised)."""
    if m <= MAX_GEMV_ROWS:
        units = max(1, 32 // unit_rows(weight.bits))
        while units > 1 and not gemv_tile_fits(weight, units):
            units //= 2
        return Plan("gemv", GemvConfig(block_n=32, units=units, split_k=2, num_warps=1, prefetch=m == 1))
    mode = MODE_DEQUANT if dtype == torch.bfloat16 and weight.bits > 7 else MODE_MAGIC
    if m <= SKINNY_MAX_M:
        return Plan("gemm", GemmConfig(16, 32, 32, split_k=2, mode=mode, num_warps=1))
    return Plan("gemm", GemmConfig(32, 32, 32, split_k=1, mode=mode, num_warps=1))


@dataclass
class SplitKWorkspace:
    """Zeroed float32 partial sums and int32 arrival counters of one device; the kernels leave them zero."""

    partials: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def allocate(cls, device: torch.device, partials: int, counters: int) -> "SplitKWorkspace":
        return cls(torch.zeros(partials, dtype=torch.float32, device=device),
                   torch.zeros(counters, dtype=torch.int32, device=device))

    def fits(self, partials: int, counters: int) -> bool:
        return self.partials.numel() >= partials and self.counters.numel() >= counters


def _graph_ms(calls: list[Callable[[], object]]) -> float:
    # a few milliseconds of back-to-back calls rank candidates as well as long runs, and tuning stays quick
    return time_calls_in_graph(calls, target_ms=3.0, replays=3) / 1e3


@dataclass
class KernelTuner:
    """Chooses a plan per TuneKey once (timing every candidate that computes the right result) and caches it.
    timer(calls) -> milliseconds per call, the calls run in turn (the same op on different weight copies)."""

    timer: Callable[[list[Callable[[], object]]], float] = _graph_ms
    plans: dict[TuneKey, Plan] = field(default_factory=dict)
    timings: dict[TuneKey, list[tuple[str, float | str]]] = field(default_factory=dict)

    def choose(self, key: TuneKey, candidates: list[Plan], run: Callable[[Plan], torch.Tensor],
               reference: Callable[[], torch.Tensor],
               timing_calls: Callable[[Plan], list[Callable[[], object]]] | None = None) -> Plan:
        if key in self.plans:
            return self.plans[key]
        expected = reference().float()
        scale = expected.norm().item() or 1.0
        results: list[tuple[str, float | str]] = []
        best, best_ms = None, math.inf
        for plan in candidates:
            try:
                got = run(plan).float()
                error = (got - expected).norm().item() / scale
                if not math.isfinite(error) or error > 2e-2:
                    results.append((plan.describe(), f"wrong result (relative error {error:.2e})"))
                    continue
                calls = timing_calls(plan) if timing_calls else [lambda: run(plan)]
                ms = self.timer(calls)
            except Exception as exc:  # a config that fails to compile or launch is skipped, not fatal
                results.append((plan.describe(), f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                continue
            results.append((plan.describe(), ms))
            if ms < best_ms:
                best, best_ms = plan, ms
        if best is None:
            best = Plan("dequant")
            logger.warning("triton GPTQ: no kernel config worked for %s; using dequantize + torch.matmul", key)
        else:
            logger.info("triton GPTQ: %s -> %s (%.1f us)", key, best.describe(), best_ms * 1e3)
        self.plans[key] = best
        self.timings[key] = results
        return best


def weight_copies(weight: GptqComputeWeight, count: int) -> list[GptqComputeWeight]:
    """weight plus count - 1 copies of its streamed tensors (codes, scales, zeros), for timing from DRAM."""
    clones = [
        dataclasses.replace(weight, qweight=weight.qweight.clone(), scales=weight.scales.clone(),
                            zeros=None if weight.zeros is None else weight.zeros.clone())
        for _ in range(count - 1)
    ]
    return [weight] + clones


def kernel_plan_store(directory: Path | None) -> PlanStore | None:
    """The on-disk plan cache in `directory` (None: no cache) for this package's kernels as they are now."""
    if directory is None:
        return None
    versions = {"torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda)}
    sources = [*Path(__file__).parent.glob("*.py"), *Path(__file__).parent.glob("*.cu")]
    return PlanStore(directory, kernel_fingerprint(sources, versions), PLAN_TYPES, Plan)


def stored_plan(store: PlanStore | None, device_name: str, key: TuneKey, candidates: list[Plan]) -> Plan | None:
    """The plan the cache holds for `key`, if it is still one of the candidates (else the layer is re-tuned)."""
    if store is None:
        return None
    plan = store.get(device_name, key)
    return plan if plan in candidates else None


class TritonBackend:
    """GPTQ matmul through the Triton kernels of this package. State (plans, split-K workspaces) lives on the
    instance: share one instance across layers. The plan of each M bucket is decided at its first call: a plan
    stored in `plan_store` (tuned before, by `qtool tune` or a tuning backend), else with tune a timing of every
    candidate (stored for the next process), else a default plan by rule (default_plans.py), with one log line per
    backend saying so. That first call may grow the workspace, so run every bucket once before capturing CUDA
    graphs. Layers share one workspace per device: calls must not run concurrently on different streams.
    plan_store None: nothing read or written. Built directly (tests, benchmarks) the backend tunes; the registry's
    (default_triton_backend) does not: timing never lands inside a user's request."""

    name = "triton"

    def __init__(self, tune: bool = True, tuner: KernelTuner | None = None, plan_store: PlanStore | None = None):
        self.tune = tune
        self.tuner = tuner or KernelTuner()
        self.plan_store = plan_store
        self.plans: dict[TuneKey, Plan] = {}  # decided plans (stored, tuned or default), by key
        self.default_keys: set[TuneKey] = set()  # the keys served by a default plan
        self._workspaces: dict[str, SplitKWorkspace] = {}
        # Outgrown workspaces stay alive: a CUDA graph captured earlier replays into the buffers it saw, and freeing
        # them would hand that memory to other tensors the replay would then overwrite.
        self._outgrown_workspaces: list[SplitKWorkspace] = []
        self.cuda_gemv: CudaGemv | None = None  # built (or found unbuildable) at the first 4-bit CUDA layer

    def supports(self, device: torch.device | str, bits: int, group_size: int, m: int = 1) -> str | None:
        """None when this backend can serve such a layer, else why not."""
        device = torch.device(device)
        if bits not in GPTQ_BITS:
            return f"{bits}-bit weights are not supported ({', '.join(map(str, GPTQ_BITS))} are)"
        return triton_device_problem(device, triton_interpreted())

    def prepare(self, tensors) -> GptqComputeWeight:
        """Repack one layer (a GptqLinearTensors) into the compute layout; reserves its split-K workspace."""
        weight = repack_gptq(tensors.qweight, tensors.qzeros, tensors.scales, tensors.g_idx, tensors.bits,
                             tensors.checkpoint_format, tensors.bias)
        self._workspace(weight.qweight.device, SKINNY_MAX_M * weight.out_features,
                        triton.cdiv(weight.out_features, 16))
        if self.cuda_gemv is None and weight.bits == 4 and weight.qweight.is_cuda and not triton_interpreted():
            # at load time, never inside a request: the first build takes about a minute
            self.cuda_gemv = load_cuda_gemv(weight.qweight.device)
            if self.cuda_gemv.module is None:
                logger.info("CUDA GEMV not used (%s): the Triton GEMV serves 4-bit decode", self.cuda_gemv.problem)
        return weight

    @property
    def cuda_gemv_ready(self) -> bool:
        return self.cuda_gemv is not None and self.cuda_gemv.module is not None

    def _workspace(self, device: torch.device, partials: int, counters: int) -> SplitKWorkspace:
        key = str(device)
        current = self._workspaces.get(key)
        if current is None or not current.fits(partials, counters):
            if current is not None:
                partials = max(partials, current.partials.numel())
                counters = max(counters, current.counters.numel())
                self._outgrown_workspaces.append(current)
            current = SplitKWorkspace.allocate(device, partials, counters)
            self._workspaces[key] = current
        return current

    def run_plan(self, plan: Plan, x: torch.Tensor, weight: GptqComputeWeight) -> torch.Tensor:
        """y [M, N] for a 2-D x with unit column stride, served exactly as `plan` says."""
        if plan.kind == "dequant":
            return gptq_matmul_dequant(x, weight)
        m, n = x.shape[0], weight.out_features
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if plan.kind == "left":
            ws = self._workspace(x.device, *(max(1, size) for size in left_workspace(m, weight, plan.config)))
        elif plan.kind == "cuda_gemv" or plan.config.split_k > 1:  # the CUDA GEMV may split more than asked
            ws = self._workspace(x.device, m * n, triton.cdiv(m, 16) * triton.cdiv(n, 16))
        else:  # unused by the kernel; any zeroed buffers do
            ws = self._workspace(x.device, 1, 1)
        if plan.kind == "gemv":
            return gptq_gemv(x, weight, plan.config, out, ws.partials, ws.counters)
        if plan.kind == "cuda_gemv":
            return gptq_gemv_cuda(self.cuda_gemv, x, weight, plan.config, out, ws.partials, ws.counters)
        if plan.kind == "left":
            return gptq_gemm_left(x, weight, plan.config, out, ws.partials, ws.counters)
        return gptq_gemm(x, weight, plan.config, out, ws.partials, ws.counters)

    def plan_for(self, x: torch.Tensor, weight: GptqComputeWeight) -> Plan:
        m = x.shape[0]
        if triton_interpreted():
            return interpreter_plan(weight, m, x.dtype)
        key = tune_key(weight, m, x.dtype, x.device)
        cached = self.plans.get(key)  # the common case: decided before; build nothing per call
        if cached is not None:
            return cached
        return self.decide_plan(key, x, weight, GpuFacts.of(x.device))

    def decide_plan(self, key: TuneKey, x: torch.Tensor, weight: GptqComputeWeight, gpu: GpuFacts) -> Plan:
        """The plan of a key seen for the first time: stored, else tuned (with tune), else the default by rule.
        Candidates are built for the bucket's M, so a plan tuned at the bucket serves every M inside it."""
        candidates = candidate_plans(weight, key.m_bucket, x.dtype, gpu.num_sms, self.cuda_gemv_ready)
        stored = stored_plan(self.plan_store, gpu.name, key, candidates)
        if stored is not None:
            logger.info("triton GPTQ: %s -> %s (tuned before: %s)", key, stored.describe(), self.plan_store.path)
            self.plans[key] = stored
            return stored
        fallback = default_plan(weight, key.m_bucket, x.dtype, gpu, candidates, self.cuda_gemv_ready)
        if not self.tune:
            self._note_defaults(gpu)
            self.plans[key] = fallback
            self.default_keys.add(key)
            return fallback
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # timing needs its own graphs: serve this capture with the default plan, tune on an eager call
            return fallback
        plan = self._tune(key, x, weight, candidates)
        self.plans[key] = plan
        timings = self.tuner.timings.get(key, [])
        timed = any(name == plan.describe() and isinstance(ms, float) for name, ms in timings)
        if self.plan_store is not None and timed:  # not the fallback of a tuning in which nothing ran
            self.plan_store.put(gpu.name, key, plan)
        return plan

    def _tune(self, key: TuneKey, x: torch.Tensor, weight: GptqComputeWeight, candidates: list[Plan]) -> Plan:
        # on the GPU the timed calls cycle through weight copies so that each reads its weight from DRAM
        copies = weight_copies(weight, copies_to_defeat_l2(weight.nbytes(), x.device)) if x.is_cuda else [weight]
        return self.tuner.choose(
            key, candidates, lambda plan: self.run_plan(plan, x, weight),
            lambda: torch.matmul(x.float(), gptq_dequantize(weight, torch.float32))
            + (0 if weight.bias is None else weight.bias.float()),
            timing_calls=lambda plan: [lambda w=w: self.run_plan(plan, x, w) for w in copies],
        )

    def _note_defaults(self, gpu: GpuFacts) -> None:
        """One log line per backend (the registry keeps one per process) the first time a default plan serves."""
        if self.default_keys:
            return
        family = gpu_family(gpu.capability)
        rules = (f"by the measured rules for {family}" if rules_for(gpu.capability)
                 else f"each layer's first candidate: no measured rules for {family}")
        where = self.plan_store.path if self.plan_store is not None else "nowhere (QTOOL_CACHE_DIR=off)"
        logger.warning("triton GPTQ kernels on %s: default plans (%s) for layer shapes without a tuned plan; "
                       "`qtool tune MODEL` tunes them ahead into %s", gpu.name, rules, where)

    def matmul(self, x: torch.Tensor, weight: GptqComputeWeight) -> torch.Tensor:
        """y[..., N] = x[..., K] @ W^T + bias, in x's dtype."""
        if x.shape[-1] != weight.in_features:
            raise QtoolError(f"input has {x.shape[-1]} features, the quantized linear expects {weight.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, weight.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, weight.out_features)
        if x2.stride(-1) != 1 or (x2.shape[0] == 1 and not x2.is_contiguous()):
            x2 = x2.contiguous()
        if x.dtype not in KERNEL_DTYPES:
            y = gptq_matmul_dequant(x2, weight)
        else:
            y = self.run_plan(self.plan_for(x2, weight), x2, weight)
        return y.reshape(*lead, weight.out_features)


def default_triton_backend() -> TritonBackend:
    """The registry's factory: plans tuned ahead (`qtool tune`) per GPU model and kernel version, read from qtool's
    cache root ($QTOOL_CACHE_DIR/tuning, default ~/.cache/qtool/tuning; QTOOL_CACHE_DIR=off: none), else default
    plans by rule: no timing inside a user's request."""
    return TritonBackend(tune=False, plan_store=kernel_plan_store(default_cache_dir()))


def tuning_triton_backend(plan_store: PlanStore | None) -> TritonBackend:
    """A backend that times every new key's candidates and stores the winner in `plan_store` (what `qtool tune`
    runs)."""
    return TritonBackend(tune=True, plan_store=plan_store)
