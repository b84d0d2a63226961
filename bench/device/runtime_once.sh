#!/usr/bin/env bash
# One device call for the engine (issue 23) when the session's device time allows no second call: the engine's GPU
# tests (CUDA graphs, flash prefill, decode step), then bench/runtime/runtime_bench.py's scenarios, each in its own
# process under its own limit. SmolLM2 rows use its config and tokenizer with random weights (--smol-shape: the
# GGUF exceeds one call's carry; tokens/s at a fixed length do not depend on the weights' values); ExLlamaV2 is
# skipped (its extension build alone takes minutes). Carry: .device-data/runtime-small .whl/runtime
# (bench/device/prepare_carry.sh, then the smollm2-shape folder: config + tokenizer saved from the GGUF model).
#   bash bench/device/runtime_once.sh      -> $OUT/gpu_tests.log, $OUT/runtime_bench.jsonl, $OUT/runtime_bench.log
set -uo pipefail
OUT_DEFAULT=/tmp/runtime_once_out LOG_NAME=runtime_bench.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA="$REPO/.device-data/runtime-small"
mkdir -p /tmp/runtime_work
install_wheels /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1
timeout "${TESTS_LIMIT_S:-70}" python3 -m pytest -q -p no:cacheprovider -rfE tests/runtime/engine/test_cuda_graphs.py \
    tests/runtime/engine/test_prefill_attention.py tests/runtime/engine/test_decode_step.py >"$OUT/gpu_tests.log" 2>&1
log "gpu tests: exit $?"; tail -3 "$OUT/gpu_tests.log"
bench() {  # bench LIMIT_S args...
    local limit=$1; shift
    log "$*"
    timeout "$limit" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench.jsonl" --work /tmp/runtime_work \
        --smol-shape "$DATA/smollm2-shape" --data "$DATA" --skip-exllamav2 "not run: one device call's time" "$@" 2>&1 \
        | tee -a "$OUT/runtime_bench.log" | grep -E '^\||rror'
}
bench "${SMOL_LIMIT_S:-110}" --scenario smollm2-run --calibration-samples 8
bench "${DECODE_LIMIT_S:-140}" --scenario decode-7b
bench "${PREFIX_LIMIT_S:-60}" --scenario prefix --scenario kv-capacity
bench "${THROUGHPUT_LIMIT_S:-110}" --scenario throughput --requests 128 --engine-budget-s 60 --hf-requests 16
log done
