#!/usr/bin/env bash
# One device call for the CUDA GEMV (qtool/kernels/gptq_gemv_cuda.cu) and the engine's fused projections, fast prefill
# and q4 decode step, most important first, each part under its own limit and all under DEADLINE_S:
#   1. build the CUDA GEMV (cpp_extension, into $QTOOL_CACHE_DIR) and run its GPU tests;
#   2. read_floor.py at M = 1: our tuned kernel (CUDA and Triton candidates, each timed) against the read-only speed
#      of the same bytes on every Llama-2 shape;
#   3. the engine's GPU tests: fast prefill, fused projections, CUDA graphs (float and q4), the q4 kernels;
#   4. the 7B-shaped batch-1 decode, fused and unfused, under CUDA graphs (the CUDA GEMV is the default at M = 1);
#   5. SmolLM2 `run` fused and unfused with fast prefill; the prefix scenario with fast prefill on and off.
# Carry: .device-data/runtime-small .whl/runtime
#   bash bench/device/cuda_gemv_check.sh   -> $OUT/cuda_gemv_check.log, $OUT/*tests*.log, $OUT/read_floor.json, ...
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-/tmp/cuda_gemv_out}"
DATA="$REPO/.device-data/runtime-small"
WORK=/tmp/runtime_work
mkdir -p "$OUT" "$WORK"
cd "$REPO"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 QTOOL_CACHE_DIR=/tmp/qtool_cache MAX_JOBS=16
python3 -m pip install -q --no-index --no-deps --target /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1
export PYTHONPATH="$REPO:/tmp/runtime_site"
LOG="$OUT/cuda_gemv_check.log"
BEGAN=$SECONDS
DEADLINE_S="${DEADLINE_S:-585}"
log() { echo "== $* at $((SECONDS - BEGAN)) s" | tee -a "$LOG"; }
# a part's limit: its own, or what is left before the deadline
limit() { local left=$(( DEADLINE_S - (SECONDS - BEGAN) )); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }

log "cuda gemv: build + tests"
timeout "$(limit 170)" python3 -m pytest -q -p no:cacheprovider -rfE -x tests/kernels/test_gptq_gemv_cuda.py \
    >"$OUT/cuda_gemv_tests.log" 2>&1
gemv_status=$?
log "cuda gemv tests: exit $gemv_status"; tail -12 "$OUT/cuda_gemv_tests.log" | tee -a "$LOG"

if [[ $gemv_status == 0 ]]; then
    log "read floor at M = 1"
    (cd bench/kernels && timeout "$(limit 120)" python3 read_floor.py --m 1 --by-kind gemv,cuda_gemv --out "$OUT") 2>&1 | grep -vE '^\{' \
        | tail -10 | tee -a "$LOG"
fi

log "engine gpu tests"
timeout "$(limit 140)" python3 -m pytest -q -p no:cacheprovider -rfE \
    "tests/runtime/engine/test_step_overhead.py::test_a_mixed_step_on_the_gpu_through_the_fused_ops_equals_the_module_path" \
    "tests/runtime/engine/test_fused_projections.py::test_on_the_gpu_fused_triton_steps_agree_with_unfused_ones" \
    tests/runtime/engine/test_cuda_graphs.py tests/kernels/test_engine_ops_q4.py >"$OUT/engine_gpu_tests.log" 2>&1
log "engine gpu tests: exit $?"; tail -8 "$OUT/engine_gpu_tests.log" | tee -a "$LOG"

log "7B decode, fused vs unfused"
timeout "$(limit 110)" python3 bench/runtime/engine_decode.py --fusion both --ways graphs --repeats 2 \
    --out "$OUT/engine_decode_fusion.json" 2>&1 | grep -vE '^(Writing|Loading)' | tail -12 | tee -a "$LOG"

log "smollm2 run fused vs unfused, fast prefill on"
timeout "$(limit 110)" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench_fusion.jsonl" --work "$WORK" \
    --smol-shape "$DATA/smollm2-shape" --data "$DATA" --skip-exllamav2 "not run: cuda gemv check call" --fusion both \
    --scenario smollm2-run --calibration-samples 8 --fast-prefill on 2>&1 | tee -a "$LOG" | grep -E '^\||rror'
for setting in on off; do
    log "prefix, fast prefill $setting"
    timeout "$(limit 40)" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench_prefix.jsonl" --work "$WORK" \
        --scenario prefix --fast-prefill $setting 2>&1 | tee -a "$LOG" | grep -E '^\| prefix|rror'
done
log done
