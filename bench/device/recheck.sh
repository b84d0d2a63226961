#!/usr/bin/env bash
# One device call that re-measures issues 23-25 after a round of CPU work: the engine's GPU tests, serve against
# offline, `run` on SmolLM2 and the prefix cache, the QLoRA step against bitsandbytes, then the kernel profiles of
# a decode token (SmolLM2 and the 7B shape). Each part under its own limit, most important first, ~9 minutes.
# Carry: .device-data/runtime-small .whl/runtime .whl/serve .whl/finetune (64 MiB with the tree: check first).
#   bash bench/device/recheck.sh     -> $OUT/*.jsonl, $OUT/recheck.log, $OUT/gpu_tests.log
set -uo pipefail
OUT_DEFAULT=/tmp/recheck_out LOG_NAME=recheck.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA="$REPO/.device-data/runtime-small"
WORK=/tmp/runtime_work
mkdir -p "$WORK"
install_wheels /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1
log "engine gpu tests"
timeout "${TESTS_LIMIT_S:-110}" python3 -m pytest -q -p no:cacheprovider -rfE -x tests/runtime/engine/test_step_overhead.py \
    tests/runtime/engine/test_cuda_graphs.py tests/runtime/engine/test_decode_step.py >"$OUT/gpu_tests.log" 2>&1
log "gpu tests: exit $?"; tail -4 "$OUT/gpu_tests.log" | tee -a "$LOG"
log "serve"
SERVE_LIMIT_S="${SERVE_LIMIT_S:-130}" bash bench/device/serve_bench.sh >>"$LOG" 2>&1; grep -E '^\|' "$OUT/serve_bench.log"
log "runtime_bench smollm2-run, prefix"
timeout "${RUN_LIMIT_S:-130}" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench.jsonl" --work "$WORK" \
    --smol-shape "$DATA/smollm2-shape" --data "$DATA" --skip-exllamav2 "not run: recheck call" \
    --scenario smollm2-run --scenario prefix --calibration-samples 8 2>&1 | tee -a "$LOG" | grep -E '^\||rror'
log "qlora step"
TESTS_LIMIT_S=0 BENCH_LIMIT_S="${QLORA_LIMIT_S:-110}" bash bench/device/qlora_step.sh \
    --systems qtool-dequant,qtool-torch,bnb-nf4 >/dev/null 2>&1; grep -E '"comparison"|"system"' "$OUT/qlora_step.jsonl" | cut -c1-400
log "kernel profiles"
timeout "${PROFILE_LIMIT_S:-60}" python3 bench/runtime/engine_overhead.py --device cuda --out "$OUT/engine_overhead.jsonl" \
    --model "$WORK/smollm2-gptq-4bit" --path decode-step --requests 2 --kernel-profile 2>&1 | grep -vE '^(Writing|Loading)' | tail -30 | tee -a "$LOG"
timeout "${PROFILE_LIMIT_S:-60}" python3 bench/runtime/decode_profile.py --out "$OUT/decode_profile_7b.json" 2>&1 | tail -26 | tee -a "$LOG"
log done
