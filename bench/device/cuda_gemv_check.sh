#!/usr/bin/env bash
# One device call for the CUDA GEMV (qtool/kernels/gptq_gemv_cuda.cu): build it (cpp_extension, into
# $QTOOL_CACHE_DIR), run its GPU tests, then read_floor.py at M = 1 (our tuned kernel, CUDA plans among the candidates,
# against the read-only speed of the same bytes on every Llama-2 shape) and kernels.py's per-candidate timings at
# M = 1, 2, 4 for 4-bit. Then, with what time is left, the fused-projection check (fused_check.sh). Carry:
# .device-data/runtime-small .whl/runtime
#   bash bench/device/cuda_gemv_check.sh   -> $OUT/cuda_gemv_check.log, $OUT/cuda_gemv_tests.log, $OUT/read_floor.json,
#                                             $OUT/bench_kernels.json, then fused_check.sh's files
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-/tmp/cuda_gemv_out}"
mkdir -p "$OUT"
cd "$REPO"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO" QTOOL_CACHE_DIR=/tmp/qtool_cache MAX_JOBS=16
LOG="$OUT/cuda_gemv_check.log"
BEGAN=$SECONDS
log() { echo "== $* at $((SECONDS - BEGAN)) s" | tee -a "$LOG"; }
log "build + tests"
timeout "${GEMV_TESTS_LIMIT_S:-200}" python3 -m pytest -q -p no:cacheprovider -rfE -x tests/kernels/test_gptq_gemv_cuda.py \
    >"$OUT/cuda_gemv_tests.log" 2>&1
status=$?
log "cuda gemv tests: exit $status"; tail -15 "$OUT/cuda_gemv_tests.log" | tee -a "$LOG"
if [[ $status == 0 ]]; then
    log "read floor at M = 1"
    (cd bench/kernels && timeout "${FLOOR_LIMIT_S:-150}" python3 read_floor.py --m 1 --out "$OUT") 2>&1 | grep -vE '^\{' | tail -12 | tee -a "$LOG"
    log "kernels.py candidates at M = 1, 2, 4"
    (cd bench/kernels && timeout "${KERNELS_LIMIT_S:-120}" python3 kernels.py --m 1,2,4 --extra-bits "" --budget-s 100 --out "$OUT") \
        2>&1 | grep -E '^\[' | tail -30 | tee -a "$LOG"
    python3 bench/kernels/compare_plans.py "$OUT/bench_kernels.json" 2>&1 | tail -40 | tee -a "$LOG"
fi
log "cuda gemv part done"
LEFT=$(( ${DEADLINE_S:-590} - (SECONDS - BEGAN) ))
if (( LEFT > 60 )); then
    TESTS_LIMIT_S=$(( LEFT < 150 ? LEFT - 10 : 150 )) OUT="$OUT" bash bench/device/fused_check.sh
fi
