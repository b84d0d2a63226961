#!/usr/bin/env bash
# One device call for the q4 KV cache's decode step (issue 23), most important first, each part under its own limit:
# its GPU tests (the q4 write and attention kernels compiled against their references, CUDA-graph replay equal to the
# eager step with rows that fill and start blocks, greedy output with graphs / eager / modules equal), then batch-1
# decode of the random 7B shape (bf16 and 4-bit GPTQ) with the model's dtype and q4, graphs and eager, at a
# 2048-token context; then, where .device-data/runtime-small was carried, SmolLM2's `run` with --kv-cache q4 and
# auto. No carry needed for the first two parts; the third: .device-data/runtime-small .whl/runtime.
#   bash bench/device/kvq4_check.sh     -> $OUT/kvq4_check.log, $OUT/gpu_tests.log, $OUT/engine_decode_q4.json,
#                                          $OUT/runtime_bench_q4.jsonl
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-/tmp/kvq4_check_out}"
DATA="$REPO/.device-data/runtime-small"
mkdir -p "$OUT"
cd "$REPO"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO:/tmp/runtime_site"
LOG="$OUT/kvq4_check.log"
BEGAN=$SECONDS
log() { echo "== $* at $((SECONDS - BEGAN)) s" | tee -a "$LOG"; }
log "gpu tests"
timeout "${TESTS_LIMIT_S:-200}" python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_engine_ops_q4.py \
    tests/runtime/engine/test_cuda_graphs.py >"$OUT/gpu_tests.log" 2>&1
log "gpu tests: exit $?"; tail -8 "$OUT/gpu_tests.log" | tee -a "$LOG"
log "7B-shaped batch-1 decode, kv auto vs q4"
timeout "${DECODE_LIMIT_S:-240}" python3 bench/runtime/engine_decode.py --kv-cache auto q4 --ways graphs eager \
    --context 2048 --new-tokens 128 --repeats 2 --out "$OUT/engine_decode_q4.json" 2>&1 \
    | grep -vE '^(Writing|Loading)' | tail -12 | tee -a "$LOG"
if [[ -d $DATA ]]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1
    for kind in q4 auto; do
        log "smollm2 run, kv $kind"
        timeout "${RUN_LIMIT_S:-100}" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench_q4.jsonl" \
            --work /tmp/runtime_work --smol-shape "$DATA/smollm2-shape" --data "$DATA" \
            --skip-exllamav2 "not run: kv q4 check" --scenario smollm2-run --calibration-samples 8 --kv-cache $kind \
            2>&1 | tee -a "$LOG" | grep -E '^\||rror'
    done
fi
log "done"
