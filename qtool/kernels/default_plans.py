"""Default plans of the Triton GPTQ backend: which of the tuner's candidates serves a layer that has no tuned plan
yet, chosen by rule (no timing) from the M bucket, the layer's size and the GPU family. A table per family, from what
won the tuner's timing in bench/RESULTS.md's per-layer table (4-bit g128, bf16, Llama-2 7B/70B shapes, H200, runs
named below; the H100 is the same sm_90 part with slower memory). A family without measurements gets the candidate
list's own first plan. Plain data: triton_backend.py builds each pick with the tuner's own candidate builders, so a
default is always one of the candidates the tuner would time."""

from __future__ import annotations

from dataclasses import dataclass

# how a pick names the weight-left kernel's tile mode: the dtype's natural unpacking (DENORMAL for bfloat16,
# DEQUANT for float16), or PACKED (4-bit layers in fragment order only)
NATURAL, PACKED = "natural", "packed"


@dataclass(frozen=True)
class Pick:
    """One plan, named the way the tuner builds it: kind "gemv" | "left" | "dequant"; shape: the entry of the
    tuner's table (triton_backend.GEMV_SHAPES, LEFT_*_SHAPES) it is built from; for "left", the tile mode and
    PACKED's feeding knobs, and whether it runs as stream-K (offered by the tuner only where whole tiles leave a
    short last wave)."""

    kind: str
    shape: tuple = ()
    mode: str = NATURAL
    staged_words: bool = False
    scale_ahead: bool = False
    stream_k: bool = False


@dataclass(frozen=True)
class Rule:
    """Serves M buckets up to max_m of layers with at least min_values weight values (N x K) and min_out output
    features (and of `bits`, when given): the first of `picks` that is a candidate for the layer (bits, group size and dtype rule some out)."""

    max_m: int
    picks: tuple[Pick, ...]
    min_values: int = 0
    min_out: int = 0
    bits: tuple[int, ...] = ()  # only layers of these widths (empty: any)
    measured: str = ""  # where the rule comes from


def _left(bm: int, bn: int, bk: int, warps: int, stages: int, per_sm: int, **knobs) -> tuple[Pick, ...]:
    """PACKED where the layer allows (fragment order), else the natural mode, same tile shape."""
    shape = (bm, bn, bk, -1, warps, stages, per_sm)  # -1: triton_backend.NATURAL, the tuner's own spelling
    return (Pick("left", shape, PACKED, **knobs), Pick("left", shape, NATURAL))


UNBOUNDED = 1 << 30
# the M buckets `qtool tune` times by default: decode batches up to a few hundred sequences, and prefill chunks up to
# the engine's token budget (EngineConfig.max_num_batched_tokens, 2048)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# The CUDA GEMV (the "cuda_gemv" kind) is a tuner candidate, not a default: on the H100 (2026-12-07,
# bench/device/engine_call.sh's gemv stage, read_floor.py --by-kind gemv,cuda_gemv) its best plan was 4-23% slower
# than the Triton GEMV's best on every Llama-2 shape measured (7B qkv 16.6 vs 13.8 us, o 8.3 vs 7.8, gate_up 25.1
# vs 21.9, down 15.7 vs 13.6; 70B qkv 23.9 vs 20.3, o 20.6 vs 16.7).

HOPPER_RULES = (
    Rule(1, (Pick("gemv", (1024, 32, 4, True, 4, False)),), min_values=1 << 27, bits=(4,),
         measured="run 28: 70B gate_up and down at 4 bits, 1024 columns x 32 rows, no prefetch"),
    Rule(1, (Pick("gemv", (1024, 16, 4, True, 4, True)),),
         measured="run 28: 1024 columns x 16 rows (one unit at 3 bits), prefetch: the other 6 rows at 4 bits, "
                  "7 of 8 at 8 bits, 5 of 8 at 3 bits"),
    Rule(16, _left(16, 64, 128, 4, 4, 4),
         measured="runs 31, 34, 35: 16x64x128, 4 warps, 4 stages on 29 of 32 rows at M = 2..16"),
    Rule(32, _left(32, 64, 128, 4, 4, 4), min_out=8193,
         measured="run 29: 32x64x128 on qkv and gate_up (N > 8192) at M = 32"),
    Rule(32, _left(32, 128, 128, 8, 3, 2),
         measured="run 29: 32x128x128 on o_proj and down_proj (N <= 8192) at M = 32"),
    Rule(64, (Pick("left", (64, 128, 128, -1, 8, 3, 2), PACKED, staged_words=True, scale_ahead=True),
              *_left(64, 128, 128, 8, 3, 2)),
         measured="run 34: 64x128x128 PACKED with staged words and scales ahead on 5 of 8 rows at M = 64 (one of "
                  "them with 4 stages)"),
    Rule(128, (Pick("left", (128, 128, 128, -1, 8, 3, 1), stream_k=True), Pick("left", (128, 128, 128, -1, 8, 3, 1))),
         measured="run 38: 128x128x128 on 7 of 8 rows at M = 128, 5 of them as stream-K (offered where whole tiles "
                  "leave a short last wave)"),
    Rule(512, (Pick("left", (256, 128, 64, -1, 8, 4, 1)),),
         measured="run 38: 256x128x64, 4 stages, on 5 of 8 rows at M = 256 (M = 512 not measured)"),
    Rule(UNBOUNDED, (Pick("dequant"),), min_values=1 << 26,
         measured="run 36: dequantize + cuBLAS on the 4 layers of 64M values or more at M = 1024"),
    Rule(UNBOUNDED, (Pick("left", (256, 128, 64, -1, 8, 3, 1)),),
         measured="run 36: 256x128x64, 3 stages, on the 4 smaller layers at M = 1024"),
)

# GPU family -> its rules; a family is named by compute capability (gpu_family)
FAMILY_RULES = {"sm_90": HOPPER_RULES}


def gpu_family(capability: tuple[int, int]) -> str:
    """The family a GPU's rules are kept under: "sm_90" for capability 9.0 (H100, H200), "sm_MN" generally."""
    return f"sm_{capability[0]}{capability[1]}"


def rules_for(capability: tuple[int, int]) -> tuple[Rule, ...]:
    """The default-plan rules of a GPU (empty: no measurements for its family)."""
    return FAMILY_RULES.get(gpu_family(capability), ())


def rule_for(rules: tuple[Rule, ...], m_bucket: int, out_features: int, k_rows: int, bits: int) -> Rule | None:
    """The first rule serving that M bucket and layer, or None."""
    for rule in rules:
        if (m_bucket <= rule.max_m and out_features * k_rows >= rule.min_values and out_features >= rule.min_out
                and (not rule.bits or bits in rule.bits)):
            return rule
    return None
