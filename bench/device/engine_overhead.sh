#!/usr/bin/env bash
# One device call for the engine's host overhead (issue 23's `qtool run` goal: >= 600 tok/s on SmolLM2, batch 1).
# Carry, as runtime_once.sh: .device-data/runtime-small .whl/runtime (the smollm2-shape folder: SmolLM2's config and
# tokenizer; weights random: tokens/s at a fixed length do not depend on their values).
#   1. the engine's GPU tests (graphs, flash prefill, decode step, the fused prefill and one-copy sampler)
#   2. runtime_bench.py --scenario smollm2-run: the issue's figure (engine GPTQ 4-bit and float vs HF generate)
#   3. engine_overhead.py on the tiny model: host µs per decode step by phase, wall and with --sync-phases (each
#      phase then owns its GPU time: forward = the graph's GPU time per token)
#   4. engine_overhead.py on SmolLM2 (the GPTQ directory and the float one step 2 wrote): phases, first-request TTFT,
#      the GPU kernels of a decode step (--kernel-profile: why float decodes slower than GPTQ), fused prefill on/off
# About 7 minutes (each step capped by its own limit; STEPS="tests bench tiny smol" picks steps, e.g. STEPS=smol
# on a warm machine whose /tmp/runtime_work holds step 2's models).
#   bash bench/device/engine_overhead.sh    -> $OUT/gpu_tests.log, $OUT/runtime_bench.jsonl, $OUT/engine_overhead.jsonl,
#                                              $OUT/engine_overhead.log
set -uo pipefail
OUT_DEFAULT=/tmp/engine_overhead_out LOG_NAME=engine_overhead.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA="$REPO/.device-data/runtime-small"
WORK=/tmp/runtime_work
mkdir -p "$WORK"
install_wheels /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1
STEPS="${STEPS:-tests bench tiny smol}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
if want tests; then
timeout "${TESTS_LIMIT_S:-90}" python3 -m pytest -q -p no:cacheprovider -rfE tests/runtime/engine/test_cuda_graphs.py \
    tests/runtime/engine/test_prefill_attention.py tests/runtime/engine/test_decode_step.py \
    tests/runtime/engine/test_step_overhead.py >"$OUT/gpu_tests.log" 2>&1
log "gpu tests: exit $?"; tail -3 "$OUT/gpu_tests.log" | tee -a "$LOG"
fi
if want bench; then
log "runtime_bench smollm2-run"
timeout "${SMOL_LIMIT_S:-150}" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench.jsonl" --work "$WORK" \
    --smol-shape "$DATA/smollm2-shape" --data "$DATA" --skip-exllamav2 "not run: host overhead call" \
    --scenario smollm2-run --calibration-samples 8 2>&1 | tee -a "$LOG" | grep -E '^\||rror'
fi
overhead() {  # overhead LIMIT_S args...
    local limit=$1; shift
    log "engine_overhead $*"
    timeout "$limit" python3 bench/runtime/engine_overhead.py --device cuda --out "$OUT/engine_overhead.jsonl" "$@" \
        2>&1 | tee -a "$LOG" | grep -vE '^(Writing|Loading)'
}
if want tiny; then
    overhead 90 --requests 3
    overhead 90 --requests 3 --sync-phases
fi
want smol && for model in "$WORK/smollm2-gptq-4bit" "$WORK/smol-random"; do
    overhead 120 --model "$model" --path decode-step --requests 3 --kernel-profile
    overhead 90 --model "$model" --path decode-step --requests 2 --kernel-profile --no-cuda-graphs
    overhead 90 --model "$model" --path decode-step --requests 3 --sync-phases
    overhead 90 --model "$model" --path decode-step --requests 3 --fast-prefill off
done
log done
