#!/usr/bin/env bash
# One device call for the CUDA GEMV (qtool/kernels/gptq_gemv_cuda.cu), most important first, all under DEADLINE_S:
#   1. build it (cpp_extension, into $QTOOL_CACHE_DIR) and run its GPU tests;
#   2. read_floor.py at M = 1: the best right Triton GEMV and CUDA GEMV candidate on every Llama-2 shape against the
#      read-only speed of the same bytes;
#   3. with what time is left, fused_check.sh (the engine's GPU tests, the 7B-shaped decode fused and unfused, with
#      the CUDA GEMV as the M = 1 default where it built; SmolLM2 `run`; the prefix scenario; profiles).
# Carry: .device-data/runtime-small .whl/runtime
#   bash bench/device/cuda_gemv_check.sh   -> $OUT/cuda_gemv_check.log, $OUT/cuda_gemv_tests.log, $OUT/read_floor.json,
#                                             then fused_check.sh's files
set -uo pipefail
OUT_DEFAULT=/tmp/cuda_gemv_out LOG_NAME=cuda_gemv_check.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export QTOOL_CACHE_DIR=/tmp/qtool_cache MAX_JOBS=16  # the built extension is found again by later steps
DEADLINE_S="${DEADLINE_S:-585}"
log "cuda gemv: build + tests"
timeout "$(limit 170)" python3 -m pytest -q -p no:cacheprovider -rfE -x tests/kernels/test_gptq_gemv_cuda.py \
    >"$OUT/cuda_gemv_tests.log" 2>&1
status=$?
log "cuda gemv tests: exit $status"; tail -12 "$OUT/cuda_gemv_tests.log" | tee -a "$LOG"
if [[ $status == 0 ]]; then
    log "read floor at M = 1, Triton GEMV against CUDA GEMV"
    (cd bench/kernels && timeout "$(limit 120)" python3 read_floor.py --m 1 --by-kind gemv,cuda_gemv --out "$OUT") 2>&1 \
        | grep -vE '^\{' | tail -12 | tee -a "$LOG"
fi
LEFT=$(( DEADLINE_S - (SECONDS - BEGAN) ))
(( LEFT > 60 )) && DEADLINE_S=$LEFT bash bench/device/fused_check.sh
log "done"
